"""``SqliteGeoRepository`` on a real SQLite file, what only SQLite has: WAL, batches bigger than
one statement (atomic, never sharing a transaction, safe to cancel), and the migration of the
original BanGUI table. The rules both stores share are in test_repository_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.persistence.repository import SqliteGeoRepository, max_rows_per_statement
from shared.messages import GeoRow, Resolution, iso_utc

pytestmark = pytest.mark.integration

T0 = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


def row(
    ip: str,
    code: str | None = "US",
    *,
    minutes: int = 0,
    resolution: Resolution | None = None,
    provider: str | None = "embedded",
) -> GeoRow:
    if resolution is None:
        resolution = Resolution.RESOLVED if code else Resolution.FAILED
    return GeoRow(
        ip=ip,
        resolution=resolution,
        cached_at=iso_utc(T0 + timedelta(minutes=minutes)),
        country_code=code,
        country_name={"US": "United States", "DE": "Germany"}.get(code or ""),
        provider=provider,
    )


def stored(path: Path) -> dict[str, tuple[Any, ...]]:
    """What another connection (the dashboard, say) reads: committed rows only."""
    with closing(sqlite3.connect(path)) as db:
        found = db.execute(
            "SELECT ip, country_code, resolution, cached_at, provider FROM geo_cache"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in found}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "geo.sqlite3"


@pytest.fixture
async def repository(db_path: Path) -> AsyncIterator[SqliteGeoRepository]:
    repo = await SqliteGeoRepository.open(db_path)
    yield repo
    await repo.close()


async def test_rows_are_committed_once_per_batch(
    repository: SqliteGeoRepository, db_path: Path
) -> None:
    changed = await repository.upsert_many([row("8.8.8.8"), row("9.9.9.9", None)])
    assert changed == 2
    assert repository.commits == 1
    assert stored(db_path) == {
        "8.8.8.8": ("US", "resolved", iso_utc(T0), "embedded"),
        "9.9.9.9": (None, "failed", iso_utc(T0), "embedded"),
    }
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT typeof(resolution) FROM geo_cache").fetchone() == ("text",)


def test_a_batch_of_1000_fits_one_statement_with_this_sqlite() -> None:
    assert max_rows_per_statement() >= 1000


async def test_a_batch_bigger_than_one_statement_is_still_one_transaction(
    db_path: Path,
) -> None:
    repo = await SqliteGeoRepository.open(db_path, rows_per_statement=3)
    try:
        assert await repo.upsert_many([row(f"11.0.0.{i}") for i in range(1, 11)]) == 10
        assert repo.commits == 1
        assert len(stored(db_path)) == 10
        bad = row("12.0.0.8")._replace(cached_at=None)
        batch = [row(f"12.0.0.{i}") for i in range(1, 8)] + [bad]
        with pytest.raises(sqlite3.IntegrityError):  # in the third statement
            await repo.upsert_many(batch)
        assert len(stored(db_path)) == 10  # the first two statements were rolled back
    finally:
        await repo.close()


async def test_a_small_batch_never_joins_a_big_batchs_transaction(db_path: Path) -> None:
    """Were it to, the big batch's rollback would take the small batch's rows with it."""
    repo = await SqliteGeoRepository.open(db_path, rows_per_statement=4)
    try:
        big_bad = [row(f"12.0.0.{i}") for i in range(1, 11)] + [
            row("12.0.0.11")._replace(cached_at=None)
        ]
        smalls = [[row(f"11.{n}.0.1"), row(f"11.{n}.0.2")] for n in range(5)]
        results = await asyncio.gather(
            repo.upsert_many(big_bad),
            *(repo.upsert_many(b) for b in smalls),
            return_exceptions=True,
        )
        assert isinstance(results[0], sqlite3.IntegrityError)
        assert results[1:] == [2] * 5
        assert set(stored(db_path)) == {r.ip for b in smalls for r in b}
    finally:
        await repo.close()


async def test_a_big_batch_cancelled_while_waiting_for_the_lock_leaves_no_transaction_open(
    db_path: Path,
) -> None:
    """Its BEGIN still runs once the lock frees; were it left open, later batches would be
    acked but never committed."""
    repo = await SqliteGeoRepository.open(db_path, rows_per_statement=3)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        big = asyncio.create_task(repo.upsert_many([row(f"11.0.0.{i}") for i in range(1, 8)]))
        await asyncio.sleep(0.2)  # the BEGIN IMMEDIATE is waiting on the busy timeout
        big.cancel()
        other.execute("COMMIT")
        with pytest.raises(asyncio.CancelledError):
            await big
        await repo.upsert_many([row("12.0.0.1")])
        assert set(stored(db_path)) == {"12.0.0.1"}
    finally:
        other.close()
        await repo.close()
    assert set(stored(db_path)) == {"12.0.0.1"}


async def test_an_original_bangui_table_is_migrated_in_place(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT INTO geo_cache VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("8.8.8.8", "US", "United States", "AS15169", "Google LLC", "2024-01-01 00:00"),
                ("9.9.9.9", None, None, None, None, "2024-01-01 00:00"),
            ],
        )
        db.commit()
    repo = await SqliteGeoRepository.open(db_path)
    try:
        assert await repo.unresolved_ips() == ["9.9.9.9"]  # legacy: no resolution recorded
        await repo.upsert_many([row("9.9.9.9", "DE")])
        assert await repo.unresolved_ips() == []
    finally:
        await repo.close()
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT ip, asn, org FROM geo_cache WHERE ip = '8.8.8.8'").fetchone() == (
            "8.8.8.8",
            "AS15169",
            "Google LLC",
        )
        columns = [c[1] for c in db.execute("PRAGMA table_info(geo_cache)")]
    assert columns[-2:] == ["resolution", "provider"]
