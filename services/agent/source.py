"""Reads fail2ban's database without getting in its way: read-only, one short read transaction
per poll, a fresh connection each time (a replaced file is never read through an old handle).

fail2ban writes with a rollback journal in memory (``journal_mode = MEMORY``), so a reader holds
a shared lock that its writer waits for; reads here last milliseconds and a busy database is
retried on the next poll.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from services.agent.position import (
    BanRow,
    Continue,
    FileIdentity,
    Position,
    Rewind,
    on_file,
    plan_read,
)

BUSY_TIMEOUT = 1.0  # seconds a read waits for fail2ban's write lock before retrying later
REQUIRED_TABLES = ("bans", "fail2banDb")
REQUIRED_COLUMNS = ("jail", "ip", "timeofban")


class DatabaseError(Exception):
    """The database cannot be followed; the message is one line for the operator."""


class DatabaseMissing(DatabaseError):
    """No file yet (fail2ban has not started, or is replacing it): wait for it."""


class NotFail2banDatabase(DatabaseError):
    pass


class DatabaseUnreadable(DatabaseError):
    pass


class DatabaseBusy(DatabaseError):
    """fail2ban held its lock longer than ``BUSY_TIMEOUT``, or the file changed mid-read."""


@dataclass(frozen=True)
class ReadResult:
    start: Position  # where this read began: the position given, or rewound, or a new file's
    rows: list[BanRow]
    newest: BanRow | None  # the last row fail2ban wrote
    replaced: bool  # the file is another one than the position's
    rewound: bool  # the anchor was gone or changed: re-read from its time


def identity_of(path: Path) -> FileIdentity:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DatabaseMissing(f"{path} does not exist (yet)") from None
    except OSError as exc:
        raise DatabaseUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None
    return FileIdentity(info.st_dev, info.st_ino)


def _connect(path: Path) -> sqlite3.Connection:
    if path.is_dir():
        raise DatabaseUnreadable(f"cannot read {path}: it is a directory, not a database file")
    if not os.access(path, os.R_OK):
        identity_of(path)  # missing: DatabaseMissing
        raise DatabaseUnreadable(f"cannot read {path}: permission denied")
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    try:
        return sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise DatabaseUnreadable(f"cannot open {path}: {exc}") from None


def _translate(path: Path, exc: sqlite3.Error) -> DatabaseError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return DatabaseBusy(f"{path} is busy: {text}")
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return NotFail2banDatabase(f"{path} is not a fail2ban database (not SQLite: {text})")
    return DatabaseUnreadable(f"cannot read {path}: {text}")


def check_database(path: Path) -> None:
    """Raise ``NotFail2banDatabase`` unless ``path`` has fail2ban's tables and ``bans`` columns."""
    connection = _connect(path)
    try:
        tables = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise NotFail2banDatabase(
                f"{path} is not a fail2ban database (no {' or '.join(missing)} table)"
            )
        columns = {row[1] for row in connection.execute("PRAGMA table_info(bans)")}
        lacking = [c for c in REQUIRED_COLUMNS if c not in columns]
        if lacking:
            raise NotFail2banDatabase(
                f"{path} is not a fail2ban database (bans has no {', '.join(lacking)} column)"
            )
    except sqlite3.Error as exc:
        raise _translate(path, exc) from None
    finally:
        connection.close()


# A NULL ip (the column allows it) reads as '': not an address, so skipped, never a crash.
_ROW = "SELECT rowid, jail, coalesce(ip, ''), timeofban FROM bans"


def _row(values: tuple[object, ...] | None) -> BanRow | None:
    if values is None:
        return None
    rowid, jail, ip, timeofban = values
    return BanRow(int(str(rowid)), str(jail), str(ip), int(str(timeofban)))


def read_bans(path: Path, position: Position, limit: int) -> ReadResult:
    """Up to ``limit`` rows after ``position`` (rewound first if its anchor moved), in rowid
    order, with fail2ban's newest row; all in one read transaction."""
    identity = identity_of(path)
    start = on_file(position, identity)
    replaced = position.identity is not None and start is not position
    connection = _connect(path)
    try:
        connection.execute("BEGIN")
        found = None
        if start.anchor is not None:
            cursor = connection.execute(f"{_ROW} WHERE rowid = ?", (start.anchor.rowid,))
            found = _row(cursor.fetchone())
        plan = plan_read(start.anchor, found)
        rewound = isinstance(plan, Rewind)
        if isinstance(plan, Rewind):
            start = _rewound(connection, start, plan)
            after = start.after_rowid
        else:
            assert isinstance(plan, Continue)
            after = plan.after_rowid
        cursor = connection.execute(
            f"{_ROW} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit)
        )
        rows = list(map(BanRow._make, cursor.fetchall()))
        newest = _row(connection.execute(f"{_ROW} ORDER BY rowid DESC LIMIT 1").fetchone())
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _translate(path, exc) from None
    finally:
        connection.close()
    if identity_of(path) != identity:
        raise DatabaseBusy(f"{path} was replaced while being read")
    return ReadResult(start, rows, newest, replaced, rewound)


def _rewound(connection: sqlite3.Connection, start: Position, plan: Rewind) -> Position:
    """Back to the last row before the first one past the anchor or as recent as it."""
    (floor,) = connection.execute(
        "SELECT min(rowid) FROM bans WHERE rowid > ? OR timeofban >= ?",
        (plan.after_rowid, plan.since),
    ).fetchone()
    if floor is None:  # nothing new: stand on the last row there is (new ones come after it)
        base = connection.execute(f"{_ROW} ORDER BY rowid DESC LIMIT 1").fetchone()
    else:
        base = connection.execute(
            f"{_ROW} WHERE rowid < ? ORDER BY rowid DESC LIMIT 1", (floor,)
        ).fetchone()
    return Position(identity=start.identity, anchor=_row(base))


def newest_ban(path: Path) -> BanRow | None:
    """fail2ban's last written row (for the lag gauge); None when unreadable or empty."""
    try:
        connection = _connect(path)
    except DatabaseError:
        return None
    try:
        return _row(connection.execute(f"{_ROW} ORDER BY rowid DESC LIMIT 1").fetchone())
    except sqlite3.Error:
        return None
    finally:
        connection.close()
