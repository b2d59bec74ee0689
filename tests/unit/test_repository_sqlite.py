"""``SqliteGeoRepository`` on a real SQLite file, what only SQLite has: WAL and its bound,
batches bigger than one statement (atomic, never sharing a transaction, safe to cancel), the
migration of the original BanGUI table, and a file deleted or replaced under the writer. The
rules both stores share are in tests/integration/test_repository_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from bangui_geo.testing.ips import public_ips
from bangui_geo.testing.rows import T0, row
from services.persistence.repository import (
    CHECKPOINT_INTERVAL_S,
    JOURNAL_SIZE_LIMIT,
    DatabaseReplaced,
    SqliteGeoRepository,
    max_rows_per_statement,
)
from shared.messages import Resolution, iso_utc


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
    assert columns[6:] == ["resolution", "provider", "failed_since", "last_seen"]


async def test_only_failed_rows_are_unresolved(repository: SqliteGeoRepository) -> None:
    await repository.upsert_many(
        [
            row("8.8.8.8", "US"),
            row("9.9.9.9", None),
            row("10.0.0.1", None, resolution=Resolution.NOT_GLOBAL),
            row("192.0.2.1", None, resolution=Resolution.REJECTED),
        ]
    )
    assert await repository.unresolved_ips() == ["9.9.9.9"]


def wal_bytes(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_a_deleted_database_is_noticed_and_the_batch_lands_in_the_new_file(
    repository: SqliteGeoRepository, db_path: Path
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    for path in db_path.parent.glob(db_path.name + "*"):
        path.unlink()
    with pytest.raises(DatabaseReplaced):
        await repository.upsert_many([row("9.9.9.9")])
    assert repository.reopens == 1
    # The requeued batch, redelivered, is written into the file now at the path.
    await repository.upsert_many([row("9.9.9.9")])
    assert set(stored(db_path)) == {"9.9.9.9"}
    assert await repository.unresolved_ips() == []


async def test_a_replaced_database_is_reopened_and_keeps_its_rows(
    repository: SqliteGeoRepository, db_path: Path, tmp_path: Path
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    restored = tmp_path / "backup.sqlite3"
    other = await SqliteGeoRepository.open(restored)
    await other.upsert_many([row("1.1.1.1", "DE")])
    await other.close()
    restored.replace(db_path)  # an operator restores a backup over the live file
    with pytest.raises(DatabaseReplaced):
        await repository.upsert_many([row("9.9.9.9")])
    await repository.upsert_many([row("9.9.9.9")])
    assert set(stored(db_path)) == {"1.1.1.1", "9.9.9.9"}


async def test_a_deleted_wal_is_noticed_and_nothing_committed_is_lost(
    repository: SqliteGeoRepository, db_path: Path
) -> None:
    await repository.upsert_many([row(ip) for ip in public_ips(500)])
    db_path.with_name(db_path.name + "-wal").unlink()
    with pytest.raises(DatabaseReplaced):
        await repository.upsert_many([row("9.9.9.9")])
    await repository.upsert_many([row("9.9.9.9")])
    # The rows only the deleted WAL held were copied into the database file before letting go.
    assert set(stored(db_path)) == {*public_ips(500), "9.9.9.9"}
    assert db_path.with_name(db_path.name + "-wal").exists()


async def test_batches_in_flight_when_the_file_goes_are_all_requeued(
    repository: SqliteGeoRepository, db_path: Path
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    await asyncio.to_thread(db_path.unlink)
    outcomes = await asyncio.gather(
        *(repository.upsert_many([row(ip)]) for ip in public_ips(8)), return_exceptions=True
    )
    assert all(isinstance(o, DatabaseReplaced) for o in outcomes), outcomes
    assert repository.reopens == 1
    assert stored(db_path) == {}


async def test_commits_carry_no_checkpoint(repository: SqliteGeoRepository, db_path: Path) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    async with repository._db.execute("PRAGMA wal_autocheckpoint") as cursor:
        assert await cursor.fetchone() == (0,)
    async with repository._db.execute("PRAGMA journal_size_limit") as cursor:
        assert await cursor.fetchone() == (JOURNAL_SIZE_LIMIT,)


async def test_the_wal_shrinks_once_a_long_reader_closes(
    repository: SqliteGeoRepository, db_path: Path
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM geo_cache").fetchone() == (1,)
        ips = public_ips(40_000)
        for start in range(0, len(ips), 1000):
            await repository.upsert_many([row(ip) for ip in ips[start : start + 1000]])
        # The reader's snapshot pins every frame written since: the WAL cannot be reused.
        await asyncio.sleep(CHECKPOINT_INTERVAL_S * 2)
        pinned = wal_bytes(db_path)
        assert pinned > 8 * 1024 * 1024
        assert reader.execute("SELECT COUNT(*) FROM geo_cache").fetchone() == (1,)
        reader.execute("COMMIT")
    finally:
        reader.close()
    # No commit comes after the reader closed: the checkpointer alone must shrink the file.
    deadline = time.monotonic() + 10 * CHECKPOINT_INTERVAL_S
    while wal_bytes(db_path) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a file
        await asyncio.sleep(0.1)
    assert wal_bytes(db_path) == 0, f"WAL still {wal_bytes(db_path)} bytes (was {pinned})"
    assert len(stored(db_path)) == 40_001


async def test_a_replacement_that_is_not_a_database_is_retried_until_fixed(
    repository: SqliteGeoRepository, db_path: Path, tmp_path: Path
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    junk = tmp_path / "junk"
    await asyncio.to_thread(junk.write_bytes, b"not a database, " * 512)
    junk.replace(db_path)
    for _ in range(2):  # each redelivery tries again, and is requeued again
        with pytest.raises(DatabaseReplaced):
            await repository.upsert_many([row("9.9.9.9")])
    await asyncio.to_thread(db_path.unlink)
    await repository.upsert_many([row("9.9.9.9")])
    assert set(stored(db_path)) == {"9.9.9.9"}
    assert repository.reopens == 1
