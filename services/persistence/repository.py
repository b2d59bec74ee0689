"""``geo_cache`` in SQLite through aiosqlite: schema, idempotent batched upserts, unresolved rows.

The persistence service is the table's single writer. WAL mode lets the BanGUI dashboard read
while we write; the WAL is checkpointed by a background task on a second connection, never inside
a commit, and a file deleted or replaced under us is noticed before a batch is acked.

A batch (up to 1000 rows) is one multi-row ``INSERT .. ON CONFLICT`` statement in autocommit mode,
so statement, transaction and commit are one: one hop to aiosqlite's thread, and SQLite runs the
whole batch and its commit without taking the GIL back for each row, which lets the event loop
decode the next message meanwhile (``executemany`` hands the GIL back and forth once per row).
Bound parameters only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from functools import lru_cache
from itertools import chain
from pathlib import Path

import aiosqlite
import structlog

from services.persistence.ports import RetryBackoff, Sightings
from shared.messages import ROW_FIELDS, GeoRow, Resolution

# Bind Resolution members as their text through the adapter table: otherwise sqlite3 probes
# each one for __conform__ (a failed attribute lookup per row, a tenth of the batch's cost).
sqlite3.register_adapter(Resolution, str)

SCHEMA = """
CREATE TABLE IF NOT EXISTS geo_cache (
    ip           TEXT PRIMARY KEY,
    country_code TEXT,
    country_name TEXT,
    asn          TEXT,
    org          TEXT,
    cached_at    TEXT NOT NULL,
    resolution   TEXT,
    provider     TEXT,
    failed_since TEXT,
    last_seen    TEXT
)
"""
# The WAL is checkpointed once it holds ~64 MiB (16,384 pages of 4 KiB) instead of SQLite's
# ~4 MiB: with one fsync'd commit per 1000 rows, the default checkpoints cost a third of
# persistence's time (bench/). The checkpoint runs on WalCheckpointer's connection, not in a commit.
WAL_AUTOCHECKPOINT_PAGES = 16_384
# After a checkpoint resets the WAL, SQLite truncates the file to this size; the checkpointer
# truncates it to zero once nothing reads it, so a long reader's WAL does not stay on disk.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
CHECKPOINT_BYTES = WAL_AUTOCHECKPOINT_PAGES * 4096  # SQLite's default page size
CHECKPOINT_INTERVAL_S = 1.0
TRUNCATE_ATTEMPTS = 5
TRUNCATE_RETRY_S = 0.01
# Page cache of 64 MiB instead of 2 MiB: the primary-key index of a few hundred thousand IPs
# stays in memory, so an upsert does not re-read index pages (bench/: 4.1 -> 3.0 us per row).
CACHE_KIB = 65_536
STATEMENT_CACHE = 8

# Columns added to a table created by the original BanGUI (ip .. cached_at only), and later to
# bangui-geo's own: all nullable, so older readers and writers, which name their columns, go on.
# failed_since: when a failed row first failed, if it failed again since (else its cached_at).
# last_seen: when ip.seen last mentioned the IP, day granularity (NULL: its cached_at).
ADDED_COLUMNS = {
    "resolution": "TEXT",
    "provider": "TEXT",
    "failed_since": "TEXT",
    "last_seen": "TEXT",
}
UNRESOLVED_INDEX = (
    "CREATE INDEX IF NOT EXISTS geo_cache_unresolved ON geo_cache (ip) WHERE country_code IS NULL"
)

# The INSERT lists the columns in GeoRow order (the wire's), so a validated row binds as it is.
ROW_COLUMNS = ROW_FIELDS
VALUES_ROW = "(" + ", ".join("?" for _ in ROW_COLUMNS) + ")"

_FAILED = Resolution.FAILED.value
# Newer answers win; a failure never overwrites a country we already have. The SET expressions
# read the stored row's old values. Only updates evaluate them: an insert binds the eight row
# columns and nothing else, so the hot path (new IPs) costs what it did.
# failed_since: a failed row failing again (a later attempt) keeps when it first failed (its
# first cached_at); any other answer clears it; an equal cached_at (a redelivery) changes nothing.
# last_seen: a redelivery keeps it; a row answered for a retry or refresh ({retried}) keeps when
# the IP was last seen (its old cached_at if it had no last_seen); any other newer row was looked
# up because ip.seen mentioned the IP, so NULL: its new cached_at says when.
ON_CONFLICT_TEMPLATE = f"""
ON CONFLICT(ip) DO UPDATE SET
    country_code = excluded.country_code,
    country_name = excluded.country_name,
    asn = excluded.asn,
    org = excluded.org,
    cached_at = excluded.cached_at,
    resolution = excluded.resolution,
    provider = excluded.provider,
    failed_since = CASE
        WHEN COALESCE(excluded.resolution, '') <> '{_FAILED}'
          OR COALESCE(geo_cache.resolution, '') <> '{_FAILED}' THEN NULL
        WHEN excluded.cached_at > geo_cache.cached_at
          THEN COALESCE(geo_cache.failed_since, geo_cache.cached_at)
        ELSE geo_cache.failed_since END,
    last_seen = CASE
        WHEN excluded.cached_at = geo_cache.cached_at THEN geo_cache.last_seen
        WHEN {{retried}} THEN COALESCE(geo_cache.last_seen, geo_cache.cached_at)
        ELSE NULL END
WHERE excluded.cached_at >= geo_cache.cached_at
  AND (excluded.country_code IS NOT NULL OR geo_cache.country_code IS NULL)
"""
ON_CONFLICT = ON_CONFLICT_TEMPLATE.format(retried="FALSE")
# The retried IPs come as one JSON array parameter, after the rows' parameters.
ON_CONFLICT_RETRIED = ON_CONFLICT_TEMPLATE.format(
    retried="excluded.ip IN (SELECT value FROM json_each(?))"
)


@lru_cache(maxsize=STATEMENT_CACHE)
def upsert_sql(rows: int, retried: bool = False) -> str:
    """The upsert of ``rows`` rows in one statement (sqlite3 caches the prepared statement);
    ``retried``: with the JSON array of retried IPs as its last parameter."""
    values = ", ".join([VALUES_ROW] * rows)
    conflict = ON_CONFLICT_RETRIED if retried else ON_CONFLICT
    return f"INSERT INTO geo_cache ({', '.join(ROW_COLUMNS)}) VALUES {values}{conflict}"


# One row per execution: the statement of the bare executemany baseline in bench/.
UPSERT = upsert_sql(1)


def max_rows_per_statement() -> int:
    """Rows one upsert statement can bind under this SQLite library's variable limit."""
    with closing(sqlite3.connect(":memory:")) as probe:
        return max(1, probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(ROW_COLUMNS))


# Legacy rows (resolution NULL) with no country are retried too; not_global/rejected never.
SELECT_UNRESOLVED = f"""
SELECT ip FROM geo_cache
WHERE country_code IS NULL AND (resolution IS NULL OR resolution = '{Resolution.FAILED.value}')
"""
# The same under the back-off: a failed row that first failed after {0} (young), or was last
# tried (its cached_at: every attempt writes a new failed row) before {1}. Legacy rows: always.
SELECT_DUE = f"""
SELECT ip FROM geo_cache
WHERE country_code IS NULL AND (resolution IS NULL OR (resolution = '{_FAILED}'
  AND (COALESCE(failed_since, cached_at) > {{0}} OR cached_at < {{1}})))
"""

# When a row was last seen: ip.seen's day stamp, else the row's cached_at (every row was first
# written because ip.seen mentioned its IP, or by the original BanGUI when a ban did).
LAST_SEEN = "COALESCE(last_seen, cached_at)"
COUNT_UNSEEN = f"SELECT COUNT(*) FROM geo_cache WHERE {LAST_SEEN} < {{0}}"
# Prune in pages along the primary key: a read finds the next page of candidates (no write
# lock, one pass over the table in all), then a short DELETE of just those rows checks the
# condition again, so a row seen or rewritten between the two is kept.
UNSEEN_PAGE = (
    f"SELECT ip FROM geo_cache WHERE ip > {{0}} AND {LAST_SEEN} < {{1}} ORDER BY ip LIMIT {{2}}"
)
DELETE_UNSEEN = f"DELETE FROM geo_cache WHERE ip IN ({{0}}) AND {LAST_SEEN} < {{1}}"
# Sightings: one write per IP and day at most (the condition skips rows already seen that day).
MARK_SEEN = "UPDATE geo_cache SET last_seen = {0} WHERE ip IN ({1}) AND " + LAST_SEEN + " < {2}"


# Rows with a final answer, which the resolver may serve without a lookup; ``failed`` rows (and
# the original table's rows, with no resolution) stay re-resolve's business.
KNOWN_RESOLUTIONS = (Resolution.RESOLVED, Resolution.NOT_GLOBAL, Resolution.REJECTED)
KNOWN_CHUNK = 500  # IPs per query: under every SQLite's variable limit


# Resolved rows due for a refresh, oldest first (text order is time order: fixed-width ISO-8601).
# No index: a top-N scan once per re-resolve tick costs less than one more index per upsert.
SELECT_STALE = (
    f"SELECT ip FROM geo_cache WHERE resolution = '{Resolution.RESOLVED.value}'"
    " AND cached_at < {0} ORDER BY cached_at, ip LIMIT {1}"
)


# The IPs of a JSON array with no row: one primary-key probe each.
SELECT_MISSING = (
    "SELECT s.value FROM json_each(?) AS s LEFT JOIN geo_cache AS g ON g.ip = s.value"
    " WHERE g.ip IS NULL"
)


def select_known(placeholders: str) -> str:
    finals = ", ".join(f"'{r.value}'" for r in KNOWN_RESOLUTIONS)
    return (
        f"SELECT {', '.join(ROW_COLUMNS)} FROM geo_cache"
        f" WHERE ip IN ({placeholders}) AND resolution IN ({finals})"
    )


def known_row(found: Sequence[object]) -> GeoRow:
    ip, resolution, cached_at, *rest = (None if v is None else str(v) for v in found)
    assert ip is not None
    assert resolution is not None
    assert cached_at is not None
    return GeoRow(ip, Resolution(resolution), cached_at, *rest)


class DatabaseReplaced(Exception):
    """The file at the configured path (or its -wal/-shm) is not the one this repository had
    open: what was just written went to a file nobody will read. The repository has reopened the
    path (or will on the next call); the batch must be requeued, not acked."""


FileId = tuple[int, int] | None  # (st_dev, st_ino), None when the file does not exist


def file_id(path: Path) -> FileId:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def database_files(path: Path) -> tuple[Path, Path, Path]:
    """The database file and the two files WAL mode keeps beside it."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def identify(path: Path) -> tuple[FileId, ...]:
    return tuple(file_id(p) for p in database_files(path))


def changed_files(opened: tuple[FileId, ...], now: tuple[FileId, ...]) -> list[str]:
    """Which of db/-wal/-shm differ from what was open (a file absent at open is not tracked)."""
    names = ("db", "wal", "shm")
    return [name for name, was, is_ in zip(names, opened, now, strict=True) if was and was != is_]


def remove_stale_journal(path: Path, opened: tuple[FileId, ...]) -> None:
    """After closing a database that is no longer the file at ``path``: delete the -wal/-shm we
    had open if they are still there. SQLite leaves them when the database file was replaced, and
    a new file beside an old WAL would take that WAL's pages as its own (corrupting it)."""
    if file_id(path) == opened[0]:
        return  # the same database file: its WAL is SQLite's business (a reader may use it)
    for journal, was in zip(database_files(path)[1:], opened[1:], strict=True):
        if was is not None and file_id(journal) == was:
            with contextlib.suppress(FileNotFoundError):
                journal.unlink()


class SqliteGeoRepository:
    def __init__(
        self,
        path: Path,
        connection: aiosqlite.Connection,
        rows_per_statement: int,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        self._path = path
        self._db = connection
        self._opened = identify(path)
        self._rows_per_statement = rows_per_statement
        self._checkpoint_interval = checkpoint_interval
        # Held by every write: a batch too big for one statement runs as BEGIN .. COMMIT over
        # several hops, and no other batch may land inside that transaction; and reads queue
        # behind at most one write on the writer's thread.
        self._transaction = asyncio.Lock()
        self._reopen_lock = asyncio.Lock()
        self._closed_for_reopen = False  # the old file is closed and the path not yet reopened
        self._checkpointer: WalCheckpointer | None = None
        self.commits = 0
        self.reopens = 0
        self._log = structlog.get_logger("persistence")

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        rows_per_statement: int | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_S,
    ) -> SqliteGeoRepository:
        """Open (creating or migrating) ``geo_cache`` and start its WAL checkpointer;
        ``rows_per_statement`` defaults to what this SQLite's variable limit allows (4,095 rows
        with the usual 32,766)."""
        connection = await connect(path)
        if rows_per_statement is None:
            rows_per_statement = max_rows_per_statement()
        repository = cls(path, connection, rows_per_statement, checkpoint_interval)
        try:
            await repository._start_checkpointer()
        except BaseException:
            await connection.close()
            raise
        return repository

    async def upsert_many(
        self,
        rows: Sequence[GeoRow],
        retried: Sequence[str] = (),
        seen: Sightings | None = None,
    ) -> int:
        """Apply ``rows`` (and ``seen``) in one transaction with one commit; returns rows
        inserted or changed (sightings not counted).

        Raises ``DatabaseReplaced`` when the commit may have gone to a file no longer at the path.
        """
        if seen is not None and not seen.ips:
            seen = None
        if not rows and seen is None:
            return 0
        if self._closed_for_reopen:
            await self._reopen("retry")
        db = self._db
        extra: tuple[str, ...] = (json.dumps(list(retried)),) if retried else ()
        # One write at a time on the writer's thread, its file check included: a geo.known
        # read queued meanwhile waits for one commit, not for every batch in the prefetch.
        async with self._transaction:
            try:
                if len(rows) <= self._rows_per_statement and seen is None:
                    changed = await self._statement(db, rows, extra)
                else:
                    changed = await self._statements(db, rows, extra, seen)
            except Exception as exc:
                if self._db is not db:  # reopened meanwhile: the old connection was closed
                    raise DatabaseReplaced(f"{self._path} was reopened during the write") from exc
                raise
            self.commits += 1
            await self._verify(db)
        return changed

    async def _statement(
        self, db: aiosqlite.Connection, rows: Sequence[GeoRow], extra: tuple[str, ...] = ()
    ) -> int:
        params = list(chain.from_iterable(rows))
        if extra:
            params.extend(extra)
        cursor = await db.execute(upsert_sql(len(rows), bool(extra)), params)
        return cursor.rowcount

    async def _statements(
        self,
        db: aiosqlite.Connection,
        rows: Sequence[GeoRow],
        extra: tuple[str, ...] = (),
        seen: Sightings | None = None,
    ) -> int:
        """More rows than one statement may bind, or rows and sightings: BEGIN, a statement
        per slice, the sightings' update, COMMIT."""
        step, changed = self._rows_per_statement, 0
        try:  # BEGIN inside: cancelled while waiting for the write lock, it still runs later
            await db.execute("BEGIN IMMEDIATE")
            for i in range(0, len(rows), step):
                changed += await self._statement(db, rows[i : i + step], extra)
            if seen is not None:
                await db.execute(
                    MARK_SEEN.format("?", "SELECT value FROM json_each(?)", "?"),
                    (seen.at, json.dumps(list(seen.ips)), seen.day_start),
                )
            await db.execute("COMMIT")
        except BaseException:
            await db.rollback()
            raise
        return changed

    async def _verify(self, db: aiosqlite.Connection) -> None:
        """Raise ``DatabaseReplaced`` (after reopening the path) if ``db``'s files are not the
        ones at the path any more: three ``stat`` calls, a few microseconds per batch."""
        if self._db is not db:
            raise DatabaseReplaced(f"{self._path} was reopened while this batch was written")
        changed = changed_files(self._opened, identify(self._path))
        if changed:
            await self._reopen(",".join(changed))
            raise DatabaseReplaced(f"{self._path} was deleted or replaced ({', '.join(changed)})")

    async def _reopen(self, reason: str) -> None:
        """Close the files we hold and open the path again (a new, empty table if it is gone)."""
        db = self._db
        async with self._reopen_lock:
            if self._db is not db:
                return  # another batch already reopened it
            if not self._closed_for_reopen:
                self._log.error("geo_database_replaced", db_path=str(self._path), files=reason)
                await self._stop_checkpointer()
                # The WAL alone may be gone while the database file is still ours: copy what
                # only the WAL holds into the database file before letting go of it.
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.execute("PRAGMA wal_checkpoint(FULL)")
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.close()
                self._closed_for_reopen = True
                remove_stale_journal(self._path, self._opened)
            try:
                connection = await connect(self._path)
            except (sqlite3.Error, OSError) as exc:  # e.g. the folder went read-only
                raise self._reopen_failed(exc) from exc
            opened = identify(self._path)
            try:
                self._checkpointer = await WalCheckpointer.start(
                    self._path, lambda: self.commits, self._checkpoint_interval
                )
            except (sqlite3.Error, OSError) as exc:
                await connection.close()
                raise self._reopen_failed(exc) from exc
            self._db, self._opened = connection, opened
            self._closed_for_reopen = False
            self.reopens += 1
            self._log.warning("geo_database_reopened", db_path=str(self._path))

    def _reopen_failed(self, exc: Exception) -> DatabaseReplaced:
        """Logged at error; batches are requeued (after a back-off) and retry the reopen."""
        self._log.error("geo_database_reopen_failed", db_path=str(self._path), error=repr(exc))
        return DatabaseReplaced(f"cannot reopen {self._path}: {exc}")

    async def unresolved_ips(self, backoff: RetryBackoff | None = None) -> list[str]:
        if self._closed_for_reopen or changed_files(self._opened, identify(self._path)):
            await self._reopen("read")
        query: str = SELECT_UNRESOLVED
        params: tuple[str, ...] = ()
        if backoff is not None:
            query = SELECT_DUE.format("?", "?")
            params = (backoff.young_after, backoff.tried_before)
        async with self._db.execute(query, params) as cursor:
            return [str(row[0]) async for row in cursor]

    async def missing(self, ips: Sequence[str]) -> list[str]:
        async with self._db.execute(SELECT_MISSING, (json.dumps(list(ips)),)) as cursor:
            return [str(row[0]) async for row in cursor]

    async def count_unseen(self, before: str) -> int:
        async with self._db.execute(COUNT_UNSEEN.format("?"), (before,)) as cursor:
            found = await cursor.fetchone()
        return 0 if found is None else int(found[0])

    async def prune(self, before: str, chunk: int) -> int:
        """Each chunk is one autocommit DELETE of rows found by a read just before: the write
        lock is held for ``chunk`` primary-key deletes at a time (the writer waits for them
        within its busy timeout), and the loop yields between chunks."""
        deleted, after = 0, ""
        page = UNSEEN_PAGE.format("?", "?", "?")
        delete = DELETE_UNSEEN.format("SELECT value FROM json_each(?)", "?")
        while True:
            async with self._db.execute(page, (after, before, chunk)) as cursor:
                ips = [str(found[0]) async for found in cursor]
            if not ips:
                return deleted
            async with self._transaction:
                cursor = await self._db.execute(delete, (json.dumps(ips), before))
            deleted += max(cursor.rowcount, 0)
            after = ips[-1]
            await asyncio.sleep(0)

    async def stale_ips(self, older_than: str, limit: int) -> list[str]:
        if self._closed_for_reopen or changed_files(self._opened, identify(self._path)):
            await self._reopen("read")
        async with self._db.execute(SELECT_STALE.format("?", "?"), (older_than, limit)) as cursor:
            return [str(row[0]) async for row in cursor]

    async def known_rows(self, ips: Sequence[str]) -> list[GeoRow]:
        if self._closed_for_reopen or changed_files(self._opened, identify(self._path)):
            await self._reopen("read")
        out: list[GeoRow] = []
        for start in range(0, len(ips), KNOWN_CHUNK):
            chunk = list(ips[start : start + KNOWN_CHUNK])
            sql = select_known(", ".join("?" * len(chunk)))
            # One hop to aiosqlite's thread per chunk (execute, fetch and close would be three,
            # each queued behind the upserts): the resolver waits for this answer.
            out.extend(map(known_row, await self._db.execute_fetchall(sql, chunk)))
        return out

    async def _start_checkpointer(self) -> None:
        self._checkpointer = await WalCheckpointer.start(
            self._path, lambda: self.commits, self._checkpoint_interval
        )

    async def _stop_checkpointer(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await checkpointer.close()

    async def close(self) -> None:
        await self._stop_checkpointer()  # first: the writer's close is the last, final checkpoint
        if not self._closed_for_reopen:
            await self._db.close()


class WalCheckpointer:
    """Checkpoints the WAL from its own connection, so that no commit of the writer (whose
    auto-checkpoint is off) ever carries one, and shrinks the file once no reader holds it.

    Every ``interval`` seconds, when the WAL file holds ``CHECKPOINT_BYTES`` or more, or
    when no commit came since the last look: a PASSIVE checkpoint (copies what it can, blocks
    nobody), then, if that copied everything, a TRUNCATE with no busy wait, which empties the
    file unless a reader still uses it or the writer is mid-commit (then: the next round).
    """

    def __init__(
        self,
        connection: aiosqlite.Connection,
        wal_path: Path,
        commits: Callable[[], int],
        interval: float,
    ) -> None:
        self._db = connection
        self._wal_path = wal_path
        self._commits = commits
        self._interval = interval
        self._seen_commits = -1
        self._task: asyncio.Task[None] | None = None
        self.checkpoints = 0
        self.truncations = 0
        self._log = structlog.get_logger("persistence")

    @classmethod
    async def start(
        cls, path: Path, commits: Callable[[], int], interval: float
    ) -> WalCheckpointer:
        connection = await aiosqlite.connect(path, isolation_level=None)
        try:
            await connection.execute("PRAGMA busy_timeout=0")  # never wait on the writer
            await connection.execute("PRAGMA wal_autocheckpoint=0")
            await connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        except BaseException:
            await connection.close()
            raise
        checkpointer = cls(connection, database_files(path)[1], commits, interval)
        checkpointer._task = asyncio.create_task(checkpointer._run(), name="wal-checkpointer")
        return checkpointer

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.round()
            except (sqlite3.Error, OSError, ValueError) as exc:
                self._log.warning("wal_checkpoint_failed", error=repr(exc))

    async def round(self) -> None:
        try:
            size = os.stat(self._wal_path).st_size
        except FileNotFoundError:
            return
        commits = self._commits()
        idle, self._seen_commits = commits == self._seen_commits, commits
        if size == 0 or not (idle or size >= CHECKPOINT_BYTES):
            return
        _, log_frames, copied = await self._checkpoint("PASSIVE")
        self.checkpoints += 1
        if copied < log_frames:
            return  # a reader still uses part of the WAL: the next round
        for _ in range(TRUNCATE_ATTEMPTS):
            # Takes the write lock only if it is free (busy_timeout=0): the writer waits at most
            # for the frames committed since the PASSIVE round, never for a whole checkpoint.
            busy, _, _ = await self._checkpoint("TRUNCATE")
            if not busy:
                self.truncations += 1
                if size > JOURNAL_SIZE_LIMIT:
                    self._log.info("wal_truncated", wal_bytes=size)
                return
            await asyncio.sleep(TRUNCATE_RETRY_S)

    async def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        async with self._db.execute(f"PRAGMA wal_checkpoint({mode})") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._db.close()


async def connect(path: Path) -> aiosqlite.Connection:
    """The writer's connection, with ``geo_cache`` created or migrated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit: each upsert is a single statement, hence its own transaction. A prepared
    # 1000-row upsert holds ~0.7 MiB and every flush ends with a batch of another size, so
    # the statement cache is kept small (sqlite3's default of 128 grew RSS by ~95 MiB).
    connection = await aiosqlite.connect(
        path, isolation_level=None, cached_statements=STATEMENT_CACHE
    )
    try:
        await connection.execute("PRAGMA journal_mode=WAL")
        await connection.execute("PRAGMA synchronous=FULL")
        await connection.execute("PRAGMA busy_timeout=5000")
        # No checkpoint inside a commit: WalCheckpointer runs them on its own connection.
        await connection.execute("PRAGMA wal_autocheckpoint=0")
        await connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        await connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        await ensure_schema(connection)
    except BaseException:
        await connection.close()
        raise
    return connection


async def ensure_schema(db: aiosqlite.Connection) -> None:
    """Create the table, or bring an older one (original BanGUI's, say) up to date, atomically."""
    await db.execute("BEGIN IMMEDIATE")
    await db.execute(SCHEMA)
    async with db.execute("PRAGMA table_info(geo_cache)") as cursor:
        present = {str(row[1]) async for row in cursor}
    for column, kind in ADDED_COLUMNS.items():
        if column not in present:
            await db.execute(f"ALTER TABLE geo_cache ADD COLUMN {column} {kind}")
    await db.execute(UNRESOLVED_INDEX)
    await db.execute("COMMIT")


def is_transient(exc: sqlite3.Error) -> bool:
    """Locked or full: worth a requeue after a back-off rather than a dead letter."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in text or "busy" in text or "full" in text or "disk i/o" in text
    )
