"""Which ``geo_cache`` store a process uses: PostgreSQL when ``GEO_DB_URL`` is set, else the
SQLite file at ``GEO_DB_PATH``. The one place that names both implementations.

The PostgreSQL driver is imported only when it is used, so a SQLite install needs no extra.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

from services.persistence.pg_url import DatabaseUrlError, check_reachable, redacted
from services.persistence.ports import GeoRepository
from services.persistence.repository import SqliteGeoRepository
from shared.settings import Settings, SettingsError


def db_url(settings: Settings) -> str | None:
    return None if settings.db_url is None else settings.db_url.get_secret_value()


def describe(settings: Settings) -> dict[str, str]:
    """Log fields naming the store (the password redacted)."""
    url = db_url(settings)
    if url is None:
        return {"store": "sqlite", "db_path": str(settings.db_path)}
    return {"store": "postgres", "db": redacted(url)}


def check_database(settings: Settings) -> None:
    """Start check: ``GEO_DB_URL``, when set, names a database we can connect to; else
    ``GEO_DB_PATH`` is a SQLite file we can open and write, or one we can create."""
    url = db_url(settings)
    if url is None:
        problem = sqlite_path_problem(settings.db_path)
        if problem is not None:
            raise SettingsError(f"GEO_DB_PATH: {problem}")
        return
    try:
        check_reachable(url)
    except DatabaseUrlError as exc:
        raise SettingsError(f"GEO_DB_URL: {exc}") from None


def sqlite_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold geo_cache, in a few words, or None. The folder is created here,
    as persistence would; an existing file is opened and read, never written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {path.parent}: {exc.strerror or exc}"
    if not path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"cannot create {path}: the folder {path.parent} is not writable"
        return None
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"cannot write {path}: permission denied"
    try:
        with closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a SQLite database ({exc})"
    return None


async def open_repository(settings: Settings) -> GeoRepository:
    url = db_url(settings)
    if url is None:
        return await SqliteGeoRepository.open(settings.db_path)
    from services.persistence.repository_pg import PostgresGeoRepository

    return await PostgresGeoRepository.open(url)
