"""The repository port's rules, run against both stores: SQLite on a real file and PostgreSQL on
a real server. What one store does, the other must: same rows, same counts, same rollbacks."""

from __future__ import annotations

import asyncio
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
from services.persistence.ports import GeoRepository, RetryBackoff, Sightings
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
    retention: Callable[[], dict[str, tuple[Any, Any]]] = dict

    def days(self) -> dict[str, tuple[Any, Any]]:
        """ip -> (failed_since, last_seen)."""
        return self.retention()

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

    def retention() -> dict[str, tuple[Any, Any]]:
        with closing(sqlite3.connect(path)) as db:
            found = db.execute("SELECT ip, failed_since, last_seen FROM geo_cache").fetchall()
        return {r[0]: (r[1], r[2]) for r in found}

    return Store(
        "sqlite",
        lambda: SqliteGeoRepository.open(path),
        read,
        legacy,
        sqlite3.IntegrityError,
        retention,
    )


def postgres_store(url: str) -> Store:
    def legacy() -> None:
        with psycopg.connect(url) as db:
            db.execute(LEGACY_TABLE)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO geo_cache VALUES (%s, %s, %s, %s, %s, %s)", LEGACY_ROWS
                )

    def retention() -> dict[str, tuple[Any, Any]]:
        with psycopg.connect(url, autocommit=True) as db:
            found = db.execute("SELECT ip, failed_since, last_seen FROM geo_cache").fetchall()
        return {r[0]: (r[1], r[2]) for r in found}

    return Store(
        "postgres",
        lambda: PostgresGeoRepository.open(url),
        lambda: read_rows(url),
        legacy,
        psycopg.IntegrityError,
        retention,
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


# --- retention: failed_since, the retry back-off, last_seen, prune ------------------------------


def at(minutes: int) -> str:
    return iso_utc(T0 + timedelta(minutes=minutes))


DAY = 24 * 60  # minutes


async def test_a_failed_row_remembers_when_it_first_failed(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("9.9.9.9", None)])
    assert store.days()["9.9.9.9"] == (None, None)  # first failure: its cached_at says when
    await repository.upsert_many([row("9.9.9.9", None, minutes=10)])
    assert store.days()["9.9.9.9"][0] == at(0)
    await repository.upsert_many([row("9.9.9.9", None, minutes=20)])
    before = (store.stored(), store.days())
    await repository.upsert_many([row("9.9.9.9", None, minutes=20)])  # redelivered
    assert (store.stored(), store.days()) == before
    assert store.days()["9.9.9.9"][0] == at(0)
    await repository.upsert_many([row("9.9.9.9", "DE", minutes=30)])
    assert store.days()["9.9.9.9"][0] is None  # answered: no longer failing
    await repository.upsert_many([row("9.9.9.9", None, minutes=40)])  # never over a country
    assert store.stored()["9.9.9.9"][0] == "DE"
    assert store.days()["9.9.9.9"][0] is None


async def test_failed_rows_back_off_to_once_a_day_after_failed_max_age(
    repository: GeoRepository,
) -> None:
    now = 3 * DAY  # GEO_FAILED_MAX_AGE of a day: young since 2 days; retried if tried before
    await repository.upsert_many(
        [
            row("11.0.0.1", None, minutes=2 * DAY + 60),  # first failed an hour into "young"
            row("11.0.0.2", None),  # failed 3 days ago, tried since at 2d+1h (below)
            row("11.0.0.3", None),  # failed 3 days ago, tried since at 1d (below)
            row("11.0.0.4", None),  # failed once, 3 days ago
            row("11.0.0.5", "US"),
            row("10.0.0.1", None, resolution=Resolution.NOT_GLOBAL),
        ]
    )
    await repository.upsert_many(
        [
            row("11.0.0.1", None, minutes=2 * DAY + 300),
            row("11.0.0.2", None, minutes=2 * DAY + 60),
            row("11.0.0.3", None, minutes=DAY),
        ]
    )
    backoff = RetryBackoff(young_after=at(now - DAY), tried_before=at(now - DAY))
    assert sorted(await repository.unresolved_ips(backoff)) == ["11.0.0.1", "11.0.0.3", "11.0.0.4"]
    assert sorted(await repository.unresolved_ips()) == [f"11.0.0.{i}" for i in range(1, 5)]
    later = RetryBackoff(young_after=at(now), tried_before=at(now + DAY))  # a day on: all due
    assert len(await repository.unresolved_ips(later)) == 4


async def test_the_original_tables_rows_are_retried_whatever_the_back_off(store: Store) -> None:
    store.legacy()
    repo: GeoRepository = await store.open()
    try:
        backoff = RetryBackoff(young_after=at(0), tried_before="2000-01-01T00:00:00.000000Z")
        assert await repo.unresolved_ips(backoff) == ["9.9.9.9"]
    finally:
        await repo.close()


async def test_last_seen_follows_sightings_at_most_once_a_day(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many([row("8.8.8.8")])
    assert store.days()["8.8.8.8"] == (None, None)  # new: seen when it was looked up
    await repository.upsert_many([], seen=Sightings(["8.8.8.8"], at(60)))
    assert store.days()["8.8.8.8"][1] is None  # cached_at is that day already
    await repository.upsert_many([], seen=Sightings(["8.8.8.8", "203.0.113.1"], at(DAY)))
    assert store.days()["8.8.8.8"][1] == at(DAY)
    assert "203.0.113.1" not in store.days()  # a sighting never makes a row
    await repository.upsert_many([], seen=Sightings(["8.8.8.8"], at(DAY + 120)))
    assert store.days()["8.8.8.8"][1] == at(DAY)  # the same day: not written again
    await repository.upsert_many([row("8.8.8.8", "DE", minutes=2 * DAY)], retried=["8.8.8.8"])
    assert store.days()["8.8.8.8"][1] == at(DAY)  # a refresh is no sighting
    assert store.stored()["8.8.8.8"][0] == "DE"
    await repository.upsert_many([row("8.8.8.8", "US", minutes=3 * DAY)])
    assert store.days()["8.8.8.8"][1] is None  # looked up because seen: cached_at says when
    await repository.upsert_many([row("8.8.8.8", "DE", minutes=4 * DAY)], retried=["8.8.8.8"])
    assert store.days()["8.8.8.8"][1] == at(3 * DAY)  # kept as the last sighting's cached_at
    before = (store.stored(), store.days())
    await repository.upsert_many(
        [row("8.8.8.8", "US", minutes=3 * DAY)], seen=Sightings(["8.8.8.8"], at(3 * DAY))
    )
    assert (store.stored(), store.days()) == before  # an older row, an older sighting


async def test_rows_and_sightings_are_one_commit(repository: GeoRepository, store: Store) -> None:
    await repository.upsert_many([row("8.8.8.8"), row("1.1.1.1")])
    changed = await repository.upsert_many(
        [row("9.9.9.9", None, minutes=DAY)], seen=Sightings(["8.8.8.8"], at(DAY))
    )
    assert changed == 1
    assert repository.commits == 2
    assert store.days()["8.8.8.8"][1] == at(DAY)
    assert store.days()["1.1.1.1"][1] is None


async def test_prune_deletes_exactly_the_rows_not_seen_since(
    repository: GeoRepository, store: Store
) -> None:
    await repository.upsert_many(
        [row(f"11.0.0.{i}", minutes=-100 * DAY) for i in range(1, 8)]
        + [row("8.8.8.8", minutes=-100 * DAY), row("9.9.9.9", None, minutes=-DAY)]
    )
    await repository.upsert_many([], seen=Sightings(["8.8.8.8"], at(-DAY)))  # seen lately
    await repository.upsert_many([row("11.0.0.7", minutes=-50 * DAY)], retried=["11.0.0.7"])
    before = at(-30 * DAY)
    assert await repository.count_unseen(before) == 7  # 11.0.0.7's refresh is no sighting
    assert await repository.prune(before, chunk=2) == 7
    assert sorted(store.stored()) == ["8.8.8.8", "9.9.9.9"]
    assert await repository.count_unseen(before) == 0
    assert await repository.prune(before, chunk=2) == 0


async def test_prune_beside_a_writer_keeps_every_row_it_should(store: Store) -> None:
    writer: GeoRepository = await store.open()
    pruner: GeoRepository = await store.open()
    try:
        old = [f"11.{i // 250}.{i % 250}.1" for i in range(3000)]
        await writer.upsert_many([row(ip, minutes=-100 * DAY) for ip in old])
        rewritten = old[::7][:400]  # seen again while the prune runs: rows of their own, newer
        new = [f"12.{i // 250}.{i % 250}.1" for i in range(2000)]

        async def stream() -> None:
            for start in range(0, len(new), 100):
                batch = [row(ip) for ip in new[start : start + 100]]
                batch += [row(ip) for ip in rewritten[start // 5 : start // 5 + 20]]
                await writer.upsert_many(sorted(batch))
                await asyncio.sleep(0)

        deleted, _ = await asyncio.gather(pruner.prune(at(-30 * DAY), chunk=100), stream())
        assert set(store.stored()) == set(new) | set(rewritten)
        assert len(old) - len(rewritten) <= deleted <= len(old)
    finally:
        await pruner.close()
        await writer.close()


async def test_missing_names_the_sighted_ips_that_have_no_row(repository: GeoRepository) -> None:
    await repository.upsert_many([row("8.8.8.8"), row("9.9.9.9", None)])
    assert sorted(await repository.missing(["8.8.8.8", "1.1.1.1", "9.9.9.9", "2.2.2.2"])) == [
        "1.1.1.1",
        "2.2.2.2",
    ]
    assert await repository.missing([]) == []
