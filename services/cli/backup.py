"""``bangui-geo backup FILE``: a consistent copy of ``geo_cache`` taken while persistence writes.

Copying a WAL database with ``cp`` can catch the main file and its ``-wal`` at different moments.
SQLite's online backup reads one snapshot under a read transaction (which never blocks the WAL
writer) into a temporary file beside the target; the copy is checked with ``integrity_check``,
synced and renamed into place, so ``FILE`` is either the old file or a complete backup.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from services.cli.database import open_read_only
from services.cli.errors import EXIT_USAGE, CliError


@dataclass(frozen=True)
class BackupResult:
    target: Path
    rows: int
    size_bytes: int


def backup(source: Path, target: Path, *, overwrite: bool = False) -> BackupResult:
    """Copy ``source`` to ``target`` as one snapshot; raise ``CliError`` saying what is wrong."""
    if target.exists() and not overwrite:
        raise CliError(f"{target} exists; pass --force to replace it", EXIT_USAGE)
    if target.resolve() == source.resolve():
        raise CliError(f"{target} is the database itself", EXIT_USAGE)
    if not target.parent.is_dir():
        raise CliError(f"folder {target.parent} does not exist", EXIT_USAGE)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with closing(open_read_only(source)) as db, closing(sqlite3.connect(partial)) as copy:
            db.backup(copy)  # one step: the whole file from one read snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            rows = int(copy.execute("SELECT COUNT(*) FROM geo_cache").fetchone()[0])
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise CliError(f"the copy failed its integrity check: {check}")
        with partial.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, target)
        _fsync_folder(target.parent)
    except sqlite3.Error as exc:
        raise CliError(f"backup to {target} failed: {exc}") from None
    except OSError as exc:
        raise CliError(f"backup to {target} failed: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(target, rows, target.stat().st_size)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
