"""The repository port's rules, run against both stores: SQLite on a real file and PostgreSQL on
a real server. What one store does, the other must: same rows, same counts, same rollbacks."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bangui_geo.testing.postgres import read_rows
from bangui_geo.testing.rows import LEGACY_ROWS, LEGACY_TABLE, T0, row
from services.persistence.ports import GeoRepository
from services.persistence.repository import SqliteGeoRepository
from services.persistence.repository_pg import PostgresGeoRepository
from shared.messages import Resolution, iso_utc

pytestmark = pytest.mark.integration


@dataclass
class Store:
    """One store under test: how to open it, read it from another connection, and make the
    original BanGUI's table in it."""

    name: str
    open: Callable[[], Any]
    read: Callable[[], dict[str, tuple[Any, ...]]]
    legacy: Callable[[], None]
    integrity_error: type[Exception]

    def stored(self) -> dict[str, tuple[Any, ...]]:
        """ip -> (country_code, resolution, cached_at, provider)."""
        return {ip: (r[0], r[5], r[4], r[6]) for ip, r in self.read().items()}


def sqlite_store(path: Path) -> Store:
    def read() -> dict[str, tuple[Any, ...]]:
        with closing(sqlite3.connect(path)) as db:
            found = db.execute(
                "SELECT ip, country_code, country_name, asn, org, cached_at, resolution, provider"
                " FROM geo_cache"
            ).fetchall()
        return {r[0]: tuple(r[1:]) for r in found}

    def legacy() -> None:
        with closing(sqlite3.connect(path)) as db:
            db.execute(LEGACY_TABLE)
            db.executemany("INSERT INTO geo_cache VALUES (?, ?, ?, ?, ?, ?)", LEGACY_ROWS)
            db.commit()

    return Store(
        "sqlite", lambda: SqliteGeoRepository.open(path), read, legacy, sqlite3.IntegrityError
    )


def postgres_store(url: str) -> Store:
    def legacy() -> None:
        with psycopg.connect(url) as db:
            db.execute(LEGACY_TABLE)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO geo_cache VALUES (%s, %s, %s, %s, %s, %s)", LEGACY_ROWS
                )

    return Store(
        "postgres",
        lambda: PostgresGeoRepository.open(url),
        lambda: read_rows(url),
        legacy,
        psycopg.IntegrityError,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "geo.sqlite3")
    return postgres_store(request.getfixturevalue("pg_url"))


@pytest.fixture
async def repository(store: Store) -> AsyncIterator[GeoRepository]:
    repo: GeoRepository = await store.open()
    yield repo
    await repo.close()


async def test_rows_are_committed_once_per_batch(repository: GeoRepository, store: Store) -> None:
    changed = await repository.upsert_many([row("8.8.8.8"), row("9.9.9.9", None)])
    assert changed == 2
    assert repository.commits == 1
    assert store.stored() == {
        "8.8.8.8": ("US", "resolved", iso_utc(T0), "embedded"),
        "9.9.9.9": (None, "failed", iso_utc(T0), "embedded"),
    }
    assert store.read()["8.8.8.8"][:4] == ("US", "United States", None, None)


async def test_newer_answers_win_and_older_ones_are_ignored(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("8.8.8.8", "US", minutes=5)])
    assert await repository.upsert_many([row("8.8.8.8", "DE", minutes=1)]) == 0
    assert store.stored()["8.8.8.8"][0] == "US"
    assert await repository.upsert_many([row("8.8.8.8", "DE", minutes=9)]) == 1
    assert store.stored()["8.8.8.8"][0] == "DE"


async def test_a_failure_never_overwrites_a_country(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("8.8.8.8", "US"), row("9.9.9.9", None)])
    await repository.upsert_many(
        [row("8.8.8.8", None, minutes=10), row("9.9.9.9", None, minutes=10, provider="ip-api")]
    )
    after = store.stored()
    assert after["8.8.8.8"] == ("US", "resolved", iso_utc(T0), "embedded")
    assert after["9.9.9.9"] == (None, "failed", iso_utc(T0 + timedelta(minutes=10)), "ip-api")
    await repository.upsert_many([row("9.9.9.9", "DE", minutes=11)])
    assert store.stored()["9.9.9.9"][:2] == ("DE", "resolved")


async def test_a_redelivered_batch_leaves_the_table_as_it_was(
    repository: GeoRepository, store: Store
) -> None:
    batch = [row(f"11.0.0.{i}", "US" if i % 2 else None) for i in range(1, 200)]
    await repository.upsert_many(batch)
    before = store.stored()
    await repository.upsert_many(batch)  # rewrites equal values: counted, but unchanged
    assert store.stored() == before
    assert len(before) == 199


async def test_the_same_ip_twice_in_one_batch_keeps_the_newer_answer(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("8.8.8.8", "DE", minutes=2), row("8.8.8.8", "US", minutes=1)])
    await repository.upsert_many([row("1.1.1.1", "US", minutes=1), row("1.1.1.1", "DE", minutes=2)])
    await repository.upsert_many([row("9.9.9.9", "US", minutes=1), row("9.9.9.9", None, minutes=2)])
    after = store.stored()
    assert (after["8.8.8.8"][0], after["1.1.1.1"][0], after["9.9.9.9"][0]) == ("DE", "DE", "US")


async def test_rows_in_any_order_give_the_same_table(
    repository: GeoRepository, store: Store
) -> None:
    batch = [row(f"11.0.{i % 7}.{i}", "US" if i % 3 else None) for i in range(1, 120)]
    assert await repository.upsert_many(batch[::-1]) == len(batch)
    assert sorted(store.stored()) == sorted(r.ip for r in batch)


async def test_a_bad_row_rolls_back_its_whole_batch(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("1.1.1.1")])
    bad = row("11.0.0.3")._replace(cached_at=None)  # NOT NULL
    with pytest.raises(store.integrity_error):
        await repository.upsert_many([row("11.0.0.1"), row("11.0.0.2"), bad, row("11.0.0.4")])
    assert list(store.stored()) == ["1.1.1.1"]
    assert repository.commits == 1
    await repository.upsert_many([row("11.0.0.5")])  # no transaction was left open
    assert set(store.stored()) == {"1.1.1.1", "11.0.0.5"}


async def test_a_batch_of_1000_is_one_commit(repository: GeoRepository, store: Store) -> None:
    batch = [row(f"11.{i // 250}.{i % 250}.1") for i in range(1000)]
    assert await repository.upsert_many(batch) == 1000
    assert repository.commits == 1
    assert len(store.stored()) == 1000


async def test_an_original_bangui_table_is_migrated_in_place(store: Store) -> None:
    store.legacy()
    repo: GeoRepository = await store.open()
    try:
        assert await repo.unresolved_ips() == ["9.9.9.9"]  # legacy: no resolution recorded
        await repo.upsert_many([row("9.9.9.9", "DE")])
        assert await repo.unresolved_ips() == []
    finally:
        await repo.close()
    again: GeoRepository = await store.open()  # a second start finds nothing to migrate
    await again.close()
    stored = store.read()
    assert stored["8.8.8.8"] == (
        "US",
        "United States",
        "AS15169",
        "Google LLC",
        "2024-01-01 00:00",
        None,
        None,
    )
    assert stored["9.9.9.9"][0] == "DE"


async def test_only_failed_rows_are_unresolved(repository: GeoRepository) -> None:
    await repository.upsert_many(
        [
            row("8.8.8.8", "US"),
            row("9.9.9.9", None),
            row("10.0.0.1", None, resolution=Resolution.NOT_GLOBAL),
            row("192.0.2.1", None, resolution=Resolution.REJECTED),
        ]
    )
    assert await repository.unresolved_ips() == ["9.9.9.9"]


async def test_known_rows_are_the_final_answers_asked_for(
    repository: GeoRepository, store: Store
) -> None:
    final = [
        row("8.8.8.8", "US", minutes=3),
        row("10.0.0.1", None, resolution=Resolution.NOT_GLOBAL),
        row("192.0.2.1", None, resolution=Resolution.REJECTED),
    ]
    await repository.upsert_many([*final, row("9.9.9.9", None), row("1.1.1.1", "DE")])
    asked = ["8.8.8.8", "9.9.9.9", "10.0.0.1", "192.0.2.1", "203.0.113.9", "8.8.8.8"]
    found = await repository.known_rows(asked)
    assert sorted(found) == sorted(final)  # failed, unknown and not-asked rows left out
    assert {r.ip: r for r in found}["8.8.8.8"] == final[0]  # every field as stored
    assert await repository.known_rows(["203.0.113.9"]) == []
    many = [f"11.{i // 250}.{i % 250}.1" for i in range(1000)]
    await repository.upsert_many([row(ip) for ip in many])
    assert len(await repository.known_rows(many)) == 1000  # more than one statement's chunk


async def test_the_original_tables_rows_are_not_known(store: Store) -> None:
    store.legacy()
    repo: GeoRepository = await store.open()
    try:  # no resolution recorded: re-resolve's business, not an answer to serve
        assert await repo.known_rows(["8.8.8.8", "9.9.9.9"]) == []
    finally:
        await repo.close()


async def test_stale_rows_are_resolved_ones_oldest_first(repository: GeoRepository) -> None:
    await repository.upsert_many(
        [
            row("8.8.8.8", "US", minutes=5),
            row("1.1.1.1", "US", minutes=1),
            row("9.9.9.9", "DE", minutes=3),
            row("4.4.4.4", "US", minutes=30),
            row("2.2.2.2", None, minutes=0),
            row("10.0.0.1", None, minutes=0, resolution=Resolution.NOT_GLOBAL),
        ]
    )
    cutoff = iso_utc(T0 + timedelta(minutes=10))
    assert await repository.stale_ips(cutoff, 2) == ["1.1.1.1", "9.9.9.9"]
    assert await repository.stale_ips(cutoff, 10) == ["1.1.1.1", "9.9.9.9", "8.8.8.8"]
    assert await repository.stale_ips(iso_utc(T0), 10) == []
