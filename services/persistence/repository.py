"""``geo_cache`` in SQLite through aiosqlite: schema, idempotent batched upserts, unresolved rows.

The persistence service is the table's single writer. WAL mode lets the BanGUI dashboard read
while we write. A batch (up to 1000 rows) is one multi-row ``INSERT .. ON CONFLICT`` statement
in autocommit mode, so statement, transaction and commit are one: one hop to aiosqlite's thread,
and SQLite runs the whole batch and its commit without taking the GIL back for each row, which
lets the event loop decode the next message meanwhile (``executemany`` hands the GIL back and
forth once per row). Bound parameters only.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Protocol

import aiosqlite

from shared.messages import GeoRow, Resolution

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
    provider     TEXT
)
"""
WAL_AUTOCHECKPOINT_PAGES = 16_384
# Page cache of 64 MiB instead of 2 MiB: the primary-key index of a few hundred thousand IPs
# stays in memory, so an upsert does not re-read index pages (bench/: 4.1 -> 3.0 us per row).
CACHE_KIB = 65_536
STATEMENT_CACHE = 8

# Columns added to a table created by the original BanGUI (ip .. cached_at only).
ADDED_COLUMNS = {"resolution": "TEXT", "provider": "TEXT"}
UNRESOLVED_INDEX = (
    "CREATE INDEX IF NOT EXISTS geo_cache_unresolved ON geo_cache (ip) WHERE country_code IS NULL"
)

# The INSERT lists the columns in GeoRow order, so a validated row binds as it is.
ROW_COLUMNS = GeoRow._fields
VALUES_ROW = "(" + ", ".join("?" for _ in ROW_COLUMNS) + ")"

# Newer answers win; a failure never overwrites a country we already have.
ON_CONFLICT = """
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


@lru_cache(maxsize=STATEMENT_CACHE)
def upsert_sql(rows: int) -> str:
    """The upsert of ``rows`` rows in one statement (sqlite3 caches the prepared statement)."""
    values = ", ".join([VALUES_ROW] * rows)
    return f"INSERT INTO geo_cache ({', '.join(ROW_COLUMNS)}) VALUES {values}{ON_CONFLICT}"


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


class GeoRepository(Protocol):
    async def upsert_many(self, rows: Sequence[GeoRow]) -> int: ...

    async def unresolved_ips(self) -> list[str]: ...


class SqliteGeoRepository:
    def __init__(self, connection: aiosqlite.Connection, rows_per_statement: int) -> None:
        self._db = connection
        self._rows_per_statement = rows_per_statement
        # Held while a batch too big for one statement runs as BEGIN .. COMMIT over several
        # hops, so that no single-statement batch lands inside that transaction.
        self._transaction = asyncio.Lock()
        self.commits = 0

    @classmethod
    async def open(
        cls, path: Path, *, rows_per_statement: int | None = None
    ) -> SqliteGeoRepository:
        """Open (creating or migrating) ``geo_cache``; ``rows_per_statement`` defaults to what
        this SQLite's variable limit allows (4,095 rows with the usual 32,766)."""
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
            # Checkpoint the WAL every ~64 MiB instead of ~4 MiB: with one fsync'd commit per
            # 1000 rows, the default checkpoints cost a third of persistence's time (bench/).
            await connection.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            await connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            await ensure_schema(connection)
        except BaseException:
            await connection.close()
            raise
        if rows_per_statement is None:
            rows_per_statement = max_rows_per_statement()
        return cls(connection, rows_per_statement)

    async def upsert_many(self, rows: Sequence[GeoRow]) -> int:
        """Apply ``rows`` in one transaction with one commit; returns rows inserted or changed."""
        if not rows:
            return 0
        if len(rows) <= self._rows_per_statement:
            if self._transaction.locked():
                async with self._transaction:
                    changed = await self._statement(rows)
            else:
                changed = await self._statement(rows)
        else:
            async with self._transaction:
                changed = await self._statements(rows)
        self.commits += 1
        return changed

    async def _statement(self, rows: Sequence[GeoRow]) -> int:
        cursor = await self._db.execute(upsert_sql(len(rows)), list(chain.from_iterable(rows)))
        return cursor.rowcount

    async def _statements(self, rows: Sequence[GeoRow]) -> int:
        """More rows than one statement may bind: BEGIN, a statement per slice, COMMIT."""
        step, changed = self._rows_per_statement, 0
        try:  # BEGIN inside: cancelled while waiting for the write lock, it still runs later
            await self._db.execute("BEGIN IMMEDIATE")
            for i in range(0, len(rows), step):
                changed += await self._statement(rows[i : i + step])
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.rollback()
            raise
        return changed

    async def unresolved_ips(self) -> list[str]:
        async with self._db.execute(SELECT_UNRESOLVED) as cursor:
            return [str(row[0]) async for row in cursor]

    async def close(self) -> None:
        await self._db.close()


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
