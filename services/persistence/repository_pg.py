"""``geo_cache`` in PostgreSQL through psycopg 3: the same table, rules and queries as SQLite.

For BanGUI on several hosts: the database server replicates and fails over, and several
persistence instances may write at once, the database arbitrating. A batch is one statement,
``INSERT .. SELECT FROM unnest(arrays) ON CONFLICT``, in autocommit: one round trip, one
transaction, one prepared statement for every batch size. The upsert rules are SQLite's own
text (``ON_CONFLICT``). PostgreSQL refuses to update one row twice in a statement, so a batch's
duplicate IPs are folded first by those same rules; rows go in IP order, so two writers lock
overlapping rows in the same order and do not deadlock. A lost server, a deadlock, a
serialization failure or a server turned read-only raises ``Transient``: the batch is requeued
and the connection reopened; a table dropped while running is created again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from itertools import pairwise

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from services.persistence.pg_url import CONNECT_TIMEOUT_S, redacted, scrub
from services.persistence.ports import RetryBackoff, Sightings
from services.persistence.repository import (
    ADDED_COLUMNS,
    COUNT_UNSEEN,
    DELETE_UNSEEN,
    MARK_SEEN,
    ON_CONFLICT,
    ON_CONFLICT_TEMPLATE,
    ROW_COLUMNS,
    SELECT_DUE,
    SELECT_STALE,
    SELECT_UNRESOLVED,
    UNRESOLVED_INDEX,
    UNSEEN_PAGE,
    known_row,
    select_known,
)
from shared.errors import Transient
from shared.messages import GeoRow

# TEXT as in SQLite, so readers see the same values. Collation "C" (byte order) whatever the
# cluster's locale: fixed-width ISO-8601 strings then compare in time order, and the IP order
# the rows are locked in is Python's sort order.
SCHEMA = """
CREATE TABLE IF NOT EXISTS geo_cache (
    ip           TEXT COLLATE "C" PRIMARY KEY,
    country_code TEXT,
    country_name TEXT,
    asn          TEXT,
    org          TEXT,
    cached_at    TEXT COLLATE "C" NOT NULL,
    resolution   TEXT,
    provider     TEXT,
    failed_since TEXT,
    last_seen    TEXT
)
"""
# Serializes schema creation between instances starting together (an arbitrary constant).
SCHEMA_LOCK = 0x6765_6F63  # "geoc"

_INSERT = (
    f"INSERT INTO geo_cache ({', '.join(ROW_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join("%b::text[]" for _ in ROW_COLUMNS)  # binary: no array text to parse
    + ")"
)
UPSERT = _INSERT + ON_CONFLICT
# With the retried IPs (see repository.ON_CONFLICT_TEMPLATE) as a last array parameter.
UPSERT_RETRIED = _INSERT + ON_CONFLICT_TEMPLATE.format(retried="excluded.ip = ANY(%b::text[])")
MARK_SEEN_PG = MARK_SEEN.format("%s", "SELECT unnest(%s::text[])", "%s")

# A server that became a read-only standby (a failover): reconnecting finds the new primary
# where the URL lists several hosts with target_session_attrs=read-write.
ReadOnly = psycopg.errors.ReadOnlySqlTransaction

log = structlog.get_logger("persistence")


def fold(rows: Sequence[GeoRow]) -> list[GeoRow]:
    """``rows`` in IP order with one row per IP: the one the upsert rules leave when the rows
    are applied in turn, as SQLite applies a multi-row statement."""
    if all(a.ip < b.ip for a, b in pairwise(rows)):
        return list(rows)  # the resolver's batches: sorted and distinct already
    kept: dict[str, GeoRow] = {}
    for row in rows:
        old = kept.get(row.ip)
        if old is None or (
            row.cached_at >= old.cached_at
            and (row.country_code is not None or old.country_code is None)
        ):
            kept[row.ip] = row
    return [kept[ip] for ip in sorted(kept)]


def columns(rows: Sequence[GeoRow]) -> list[list[str | None]]:
    """The batch as one text array per column, for ``unnest``."""
    return [[None if v is None else str(v) for v in column] for column in zip(*rows, strict=True)]


# What a copied row knew of its past (bangui-geo import-sqlite): the later last sighting, and for a
# row still failed the earlier first failure. NULL stands for the row's cached_at in both.
CARRY_RETENTION = (
    "UPDATE geo_cache AS g SET"
    " last_seen = CASE WHEN s.last_seen IS NULL THEN g.last_seen"
    " ELSE GREATEST(COALESCE(g.last_seen, g.cached_at), s.last_seen) END,"
    " failed_since = CASE WHEN s.failed_since IS NULL OR g.resolution IS DISTINCT FROM 'failed'"
    " THEN g.failed_since ELSE LEAST(COALESCE(g.failed_since, g.cached_at), s.failed_since) END"
    " FROM unnest(%s::text[], %s::text[], %s::text[]) AS s(ip, last_seen, failed_since)"
    " WHERE g.ip = s.ip AND (s.last_seen IS NOT NULL OR s.failed_since IS NOT NULL)"
)

# The IPs of an array with no row: one primary-key probe each.
SELECT_MISSING_PG = (
    "SELECT s.ip FROM unnest(%s::text[]) AS s(ip) LEFT JOIN geo_cache AS g ON g.ip = s.ip"
    " WHERE g.ip IS NULL"
)


class PostgresGeoRepository:
    def __init__(self, url: str, connection: AsyncConnection[TupleRow]) -> None:
        self._url = url
        self._db: AsyncConnection[TupleRow] | None = connection
        self._lock = asyncio.Lock()  # one statement at a time on the one connection
        self.commits = 0
        self.reopens = 0  # reconnections after a lost connection

    @classmethod
    async def open(cls, url: str) -> PostgresGeoRepository:
        """Connect and create or migrate ``geo_cache``; errors are raised as the driver's."""
        connection = await _connect(url)
        try:
            await ensure_schema(connection)
        except BaseException:
            await connection.close()
            raise
        return cls(url, connection)

    @property
    def where(self) -> str:
        return redacted(self._url)

    async def upsert_many(
        self,
        rows: Sequence[GeoRow],
        retried: Sequence[str] = (),
        seen: Sightings | None = None,
    ) -> int:
        """Apply ``rows`` in one statement, hence one transaction and one commit; with
        sightings, the upsert and their update in one transaction."""
        if seen is not None and not seen.ips:
            seen = None
        if not rows and seen is None:
            return 0
        params: list[object] = list(columns(fold(rows))) if rows else []
        if retried:
            params.append(list(retried))
        async with self._lock:
            db = await self._connection()
            try:
                if seen is None:
                    cursor = await db.execute(UPSERT_RETRIED if retried else UPSERT, params)
                    changed = max(cursor.rowcount, 0)
                else:
                    changed = await self._upsert_seen(db, rows, params, bool(retried), seen)
            except psycopg.errors.UndefinedTable as exc:  # dropped while we ran: make it again
                await ensure_schema(db)
                raise Transient(f"geo_cache was missing at {self.where}: recreated") from exc
            except (psycopg.OperationalError, psycopg.InterfaceError, ReadOnly) as exc:
                raise await self._transient("write", exc) from exc
        self.commits += 1
        return changed

    async def _upsert_seen(
        self,
        db: AsyncConnection[TupleRow],
        rows: Sequence[GeoRow],
        params: list[object],
        retried: bool,
        seen: Sightings,
    ) -> int:
        changed = 0
        async with db.transaction():
            if rows:
                cursor = await db.execute(UPSERT_RETRIED if retried else UPSERT, params)
                changed = max(cursor.rowcount, 0)
            # In IP order, as the rows: two writers lock overlapping rows in the same order.
            await db.execute(MARK_SEEN_PG, (seen.at, sorted(seen.ips), seen.day_start))
        return changed

    async def carry_retention(self, rows: Sequence[tuple[str, str | None, str | None]]) -> None:
        """(ip, last_seen, failed_since) of rows copied from another ``geo_cache``, which an
        upsert does not carry: without them a copied row would look unseen since it was
        cached (``prune``) and a long-failed one young (the retry back-off)."""
        if not rows:
            return
        ips, seen, failed = (list(column) for column in zip(*rows, strict=True))
        async with self._lock:
            db = await self._connection()
            try:
                await db.execute(CARRY_RETENTION, (ips, seen, failed))
            except (psycopg.OperationalError, psycopg.InterfaceError, ReadOnly) as exc:
                raise await self._transient("write", exc) from exc
        self.commits += 1

    async def unresolved_ips(self, backoff: RetryBackoff | None = None) -> list[str]:
        if backoff is None:
            found = await self._read(SELECT_UNRESOLVED)
        else:
            due = SELECT_DUE.format("%s", "%s")
            found = await self._read(due, (backoff.young_after, backoff.tried_before))
        return [str(row[0]) for row in found]

    async def missing(self, ips: Sequence[str]) -> list[str]:
        return [str(row[0]) for row in await self._read(SELECT_MISSING_PG, (list(ips),))]

    async def count_unseen(self, before: str) -> int:
        found = await self._read(COUNT_UNSEEN.format("%s"), (before,))
        return int(found[0][0]) if found else 0

    async def prune(self, before: str, chunk: int) -> int:
        """Pages along the primary key, each a read then a DELETE of at most ``chunk`` rows
        (autocommit: one transaction each, so row locks are held for one chunk at a time); the
        DELETE checks the condition again on each row's latest version."""
        deleted, after = 0, ""
        page = UNSEEN_PAGE.format("%s", "%s", "%s")
        delete = DELETE_UNSEEN.format("SELECT unnest(%s::text[])", "%s")
        while True:
            async with self._lock:
                db = await self._connection()
                try:
                    found = await (await db.execute(page, (after, before, chunk))).fetchall()
                    ips = [str(r[0]) for r in found]
                    if not ips:
                        return deleted
                    cursor = await db.execute(delete, (ips, before))
                except (psycopg.OperationalError, psycopg.InterfaceError, ReadOnly) as exc:
                    raise await self._transient("prune", exc) from exc
            deleted += max(cursor.rowcount, 0)
            after = ips[-1]
            await asyncio.sleep(0)

    async def stale_ips(self, older_than: str, limit: int) -> list[str]:
        found = await self._read(SELECT_STALE.format("%s", "%s"), (older_than, limit))
        return [str(row[0]) for row in found]

    async def known_rows(self, ips: Sequence[str]) -> list[GeoRow]:
        found = await self._read(select_known("SELECT unnest(%s::text[])"), (list(ips),))
        return [known_row(row) for row in found]

    async def _read(self, sql: str, args: Sequence[object] = ()) -> list[TupleRow]:
        """Every row of one query, on the one connection; a lost connection is ``Transient``."""
        async with self._lock:
            db = await self._connection()
            try:
                cursor = await db.execute(sql, args)
                return await cursor.fetchall()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise await self._transient("read", exc) from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _connection(self) -> AsyncConnection[TupleRow]:
        """The open connection, reopened after the server went away."""
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        await self.close()
        try:
            self._db = await _connect(self._url)
        except psycopg.Error as exc:
            raise Transient(
                f"geo_cache unreachable at {self.where}: {scrub(str(exc), self._url)}"
            ) from exc
        self.reopens += 1
        log.info("postgres_connection_restored", db=self.where)
        return self._db

    async def _transient(self, what: str, exc: psycopg.Error) -> Transient:
        """Deadlock, serialization failure, lost server: requeue. A broken connection is
        dropped so the next batch reconnects."""
        if self._db is not None and (
            self._db.broken or self._db.closed or isinstance(exc, ReadOnly)
        ):
            await self.close()
        reason = scrub(str(exc), self._url)
        return Transient(f"geo_cache {what} failed at {self.where}: {reason}")


async def _connect(url: str) -> AsyncConnection[TupleRow]:
    return await AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


async def ensure_schema(db: AsyncConnection[TupleRow]) -> None:
    """Create the table, or bring the original BanGUI's six columns up to date, atomically."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await db.execute(SCHEMA)
        for column, kind in ADDED_COLUMNS.items():
            await db.execute(f"ALTER TABLE geo_cache ADD COLUMN IF NOT EXISTS {column} {kind}")
        await db.execute(UNRESOLVED_INDEX)
