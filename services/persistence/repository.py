"""``geo_cache`` in SQLite through aiosqlite: schema, idempotent batched upserts, unresolved rows.

The persistence service is the table's single writer. WAL mode lets the BanGUI dashboard read
while we write; every batch is one ``executemany`` in one transaction, with bound parameters only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosqlite

from shared.messages import GeoRow, Resolution

COLUMNS = (
    "ip",
    "country_code",
    "country_name",
    "asn",
    "org",
    "cached_at",
    "resolution",
    "provider",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS geo_cache (
    ip           TEXT PRIMARY KEY,
    country_code TEXT,
    country_name TEXT,
    asn          TEXT,
    org          TEXT,
    cached_at    TEXT NOT NULL,
    resolution   TEXT,
    provider     TEXT
)
"""
WAL_AUTOCHECKPOINT_PAGES = 16_384

# Columns added to a table created by the original BanGUI (ip .. cached_at only).
ADDED_COLUMNS = {"resolution": "TEXT", "provider": "TEXT"}
UNRESOLVED_INDEX = (
    "CREATE INDEX IF NOT EXISTS geo_cache_unresolved ON geo_cache (ip) WHERE country_code IS NULL"
)

# Newer answers win; a failure never overwrites a country we already have.
UPSERT = f"""
INSERT INTO geo_cache ({", ".join(COLUMNS)}) VALUES ({", ".join("?" for _ in COLUMNS)})
ON CONFLICT(ip) DO UPDATE SET
    country_code = excluded.country_code,
    country_name = excluded.country_name,
    asn = excluded.asn,
    org = excluded.org,
    cached_at = excluded.cached_at,
    resolution = excluded.resolution,
    provider = excluded.provider
WHERE excluded.cached_at >= geo_cache.cached_at
  AND (excluded.country_code IS NOT NULL OR geo_cache.country_code IS NULL)
"""

# Legacy rows (resolution NULL) with no country are retried too; not_global/rejected never.
SELECT_UNRESOLVED = f"""
SELECT ip FROM geo_cache
WHERE country_code IS NULL AND (resolution IS NULL OR resolution = '{Resolution.FAILED.value}')
"""


Params = tuple[str, str | None, str | None, str | None, str | None, str, str, str | None]


def to_params(rows: Sequence[GeoRow]) -> list[Params]:
    """Rows in ``COLUMNS`` order, as the UPSERT statement binds them."""
    return [
        (
            r.ip,
            r.country_code,
            r.country_name,
            r.asn,
            r.org,
            r.cached_at,
            str(r.resolution),
            r.provider,
        )
        for r in rows
    ]


class GeoRepository(Protocol):
    async def upsert_many(self, rows: Sequence[GeoRow]) -> int: ...

    async def unresolved_ips(self) -> list[str]: ...


class SqliteGeoRepository:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._db = connection
        self.commits = 0

    @classmethod
    async def open(cls, path: Path) -> SqliteGeoRepository:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(path)
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=FULL")
            await connection.execute("PRAGMA busy_timeout=5000")
            # Checkpoint the WAL every ~64 MiB instead of ~4 MiB: with one fsync'd commit per
            # 1000 rows, the default checkpoints cost a third of persistence's time (bench/).
            await connection.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            await ensure_schema(connection)
        except BaseException:
            await connection.close()
            raise
        return cls(connection)

    async def upsert_many(self, rows: Sequence[GeoRow]) -> int:
        """Apply ``rows`` in one transaction; returns rows inserted or changed."""
        params = to_params(rows)
        try:
            cursor = await self._db.executemany(UPSERT, params)
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        self.commits += 1
        return cursor.rowcount

    async def unresolved_ips(self) -> list[str]:
        async with self._db.execute(SELECT_UNRESOLVED) as cursor:
            return [str(row[0]) async for row in cursor]

    async def close(self) -> None:
        await self._db.close()


async def ensure_schema(db: aiosqlite.Connection) -> None:
    await db.execute(SCHEMA)
    async with db.execute("PRAGMA table_info(geo_cache)") as cursor:
        present = {str(row[1]) async for row in cursor}
    for column, kind in ADDED_COLUMNS.items():
        if column not in present:
            await db.execute(f"ALTER TABLE geo_cache ADD COLUMN {column} {kind}")
    await db.execute(UNRESOLVED_INDEX)
    await db.commit()


def is_transient(exc: sqlite3.Error) -> bool:
    """Locked or full: worth a requeue after a back-off rather than a dead letter."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in text or "busy" in text or "full" in text or "disk i/o" in text
    )
