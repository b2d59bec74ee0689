"""Persistence handlers with an in-memory repository: batches applied, re-resolve asking the
resolver to retry the right rows, and a locked database turned into a requeue."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from services.persistence.handlers import (
    MAX_CLOCK_SKEW_S,
    PersistenceDeps,
    on_geo_upsert_batch,
    on_re_resolve,
)
from services.persistence.ports import Sightings
from services.persistence.repository import DatabaseReplaced
from shared import topology
from shared.errors import Rejected, Transient
from shared.messages import (
    GeoRow,
    GeoUpsertBatch,
    ReResolveStale,
    Resolution,
    RetryUnresolved,
    iso_utc,
)
from tests.fakes import FakePublisher, InMemoryGeoRepository

WHEN = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)


def geo_row(ip: str, code: str | None = None, resolution: Resolution | None = None) -> GeoRow:
    if resolution is None:
        resolution = Resolution.RESOLVED if code else Resolution.FAILED
    return GeoRow(ip=ip, country_code=code, resolution=resolution, cached_at=iso_utc(WHEN))


def stored_as(raw_ip: str, resolution: Resolution, code: str | None = None) -> GeoRow:
    """A row as a legacy table may hold it: the ip spelled any way, unvalidated."""
    return GeoRow(ip=raw_ip, country_code=code, resolution=resolution, cached_at=iso_utc(WHEN))


def re_resolve(tick_id: str = "re_resolve:1800000600.000") -> ReResolveStale:
    return ReResolveStale(tick_id=tick_id, issued_at=WHEN)


def retries(publisher: FakePublisher) -> list[RetryUnresolved]:
    out = publisher.on(topology.RETRY)
    assert all(isinstance(m, RetryUnresolved) for m in out)
    return [m for m in out if isinstance(m, RetryUnresolved)]


@pytest.fixture
def repository() -> InMemoryGeoRepository:
    return InMemoryGeoRepository()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def deps(repository: InMemoryGeoRepository, publisher: FakePublisher) -> PersistenceDeps:
    return PersistenceDeps(repository=repository, publisher=publisher, clock=WHEN.timestamp)


async def test_upsert_batch_is_applied(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    rows = [
        geo_row("8.8.8.8", "US"),
        geo_row("9.9.9.9"),
        geo_row("10.0.0.1", None, Resolution.NOT_GLOBAL),
    ]
    await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b1", rows=rows), deps)
    assert repository.rows == {row.ip: row for row in rows}
    assert repository.commits == 1
    assert (deps.state.batches, deps.state.rows) == (1, 3)


async def test_redelivered_batch_does_no_harm(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    batch = GeoUpsertBatch(batch_id="b1", rows=[geo_row("8.8.8.8", "US")])
    await on_geo_upsert_batch(batch, deps)
    await on_geo_upsert_batch(batch, deps)
    assert list(repository.rows) == ["8.8.8.8"]
    assert repository.rows["8.8.8.8"].country_code == "US"


async def test_re_resolve_asks_for_routable_failed_rows_normalized_and_distinct(
    deps: PersistenceDeps, repository: InMemoryGeoRepository, publisher: FakePublisher
) -> None:
    for raw, resolution, code in [
        ("8.8.8.8", Resolution.FAILED, None),
        ("::ffff:8.8.8.8", Resolution.FAILED, None),  # same address, other spelling
        ("2001:4860:4860:0:0:0:0:8888", Resolution.FAILED, None),
        ("10.0.0.1", Resolution.FAILED, None),  # private: no provider knows it
        ("2001:DB8::1", Resolution.FAILED, None),  # documentation range
        ("junk", Resolution.FAILED, None),
        ("1.1.1.1", Resolution.RESOLVED, "AU"),
        ("9.9.9.9", Resolution.REJECTED, None),
        ("100.64.0.1", Resolution.NOT_GLOBAL, None),
    ]:
        repository.rows[raw] = stored_as(raw, resolution, code)
    await on_re_resolve(re_resolve("re_resolve:42.000"), deps)
    (cmd,) = retries(publisher)
    assert cmd.tick_id == "re_resolve:42.000"
    assert cmd.ips == ["8.8.8.8", "2001:4860:4860::8888"]
    assert deps.state.retries_requested == 2
    assert {key for key, _, _ in publisher.published} == {topology.RETRY}


async def test_re_resolve_chunks_retries_by_1000(
    deps: PersistenceDeps, repository: InMemoryGeoRepository, publisher: FakePublisher
) -> None:
    ips = [f"11.0.{i // 256}.{i % 256}" for i in range(2500)]
    await repository.upsert_many([geo_row(ip) for ip in ips])
    await on_re_resolve(re_resolve(), deps)
    commands = retries(publisher)
    assert [len(c.ips) for c in commands] == [1000, 1000, 500]
    assert [ip for c in commands for ip in c.ips] == ips
    assert deps.state.retries_requested == 2500


async def test_re_resolve_with_nothing_unresolved_publishes_nothing(
    deps: PersistenceDeps, repository: InMemoryGeoRepository, publisher: FakePublisher
) -> None:
    await repository.upsert_many([geo_row("8.8.8.8", "US")])
    await on_re_resolve(re_resolve(), deps)
    assert publisher.published == []
    assert deps.state.retries_requested == 0


async def test_re_resolve_publish_failure_propagates(
    deps: PersistenceDeps, repository: InMemoryGeoRepository, publisher: FakePublisher
) -> None:
    await repository.upsert_many([geo_row("8.8.8.8")])
    publisher.fail_next = Transient("publish to geo.retry not confirmed")
    with pytest.raises(Transient):
        await on_re_resolve(re_resolve(), deps)
    assert deps.state.retries_requested == 0


@dataclass
class BrokenRepository(InMemoryGeoRepository):
    error: Exception | None = None

    async def upsert_many(
        self, rows: Sequence[GeoRow], retried: Sequence[str] = (), seen: Sightings | None = None
    ) -> int:
        assert self.error is not None
        raise self.error


@pytest.mark.parametrize(
    "message", ["database is locked", "database table is locked", "database or disk is full"]
)
async def test_locked_or_full_database_becomes_transient(message: str) -> None:
    repository = BrokenRepository(error=sqlite3.OperationalError(message))
    deps = PersistenceDeps(repository=repository, publisher=FakePublisher(), clock=WHEN.timestamp)
    with pytest.raises(Transient, match=message) as info:
        await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b", rows=[geo_row("8.8.8.8")]), deps)
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert deps.state.batches == 0


async def test_other_database_errors_are_not_transient() -> None:
    repository = BrokenRepository(error=sqlite3.IntegrityError("NOT NULL constraint failed"))
    deps = PersistenceDeps(repository=repository, publisher=FakePublisher(), clock=WHEN.timestamp)
    with pytest.raises(sqlite3.IntegrityError):
        await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b", rows=[geo_row("8.8.8.8")]), deps)
    assert deps.state.batches == 0


def dated(ip: str, moment: datetime) -> GeoRow:
    return GeoRow(
        ip=ip, country_code="KP", resolution=Resolution.RESOLVED, cached_at=iso_utc(moment)
    )


async def test_a_row_dated_in_the_future_rejects_its_batch_unwritten(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    # A year-9999 cached_at would win every later upsert: the false country would stay for good.
    rows = [geo_row("8.8.8.8", "US"), dated("1.1.1.1", datetime(9999, 12, 31, 23, 59, tzinfo=UTC))]
    with pytest.raises(Rejected, match=r"^rows\.1: cached_at 9999-12-31T23:59:00\.000000Z is more"):
        await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b", rows=rows), deps)
    assert repository.rows == {}
    assert repository.commits == 0


async def test_a_clock_a_little_ahead_is_tolerated(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    skew = timedelta(seconds=MAX_CLOCK_SKEW_S)
    await on_geo_upsert_batch(
        GeoUpsertBatch(batch_id="b", rows=[dated("1.1.1.1", WHEN + skew)]), deps
    )
    assert list(repository.rows) == ["1.1.1.1"]
    late = dated("2.2.2.2", WHEN + skew + timedelta(milliseconds=1))
    with pytest.raises(Rejected, match=r"rows\.0: cached_at"):
        await on_geo_upsert_batch(GeoUpsertBatch(batch_id="c", rows=[late]), deps)


async def test_a_replaced_database_file_becomes_transient() -> None:
    repository = BrokenRepository(error=DatabaseReplaced("geo.sqlite3 was deleted or replaced"))
    deps = PersistenceDeps(repository=repository, publisher=FakePublisher(), clock=WHEN.timestamp)
    with pytest.raises(Transient, match="deleted or replaced"):
        await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b", rows=[geo_row("8.8.8.8")]), deps)
    assert deps.state.batches == 0


async def test_re_resolve_asks_for_the_failed_rows_due_under_the_back_off(
    repository: InMemoryGeoRepository, publisher: FakePublisher
) -> None:
    deps = PersistenceDeps(
        repository=repository, publisher=publisher, clock=WHEN.timestamp, failed_max_age=3600.0
    )
    await on_re_resolve(re_resolve(), deps)
    (backoff,) = repository.backoffs
    assert backoff is not None
    assert backoff.young_after == iso_utc(WHEN - timedelta(hours=1))
    assert backoff.tried_before == iso_utc(WHEN - timedelta(days=1))


async def test_without_a_failed_max_age_every_failed_row_is_retried(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    await on_re_resolve(re_resolve(), deps)
    assert repository.backoffs == [None]


async def test_retried_ips_and_sightings_reach_the_repository(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    seen_at = iso_utc(WHEN)
    batch = GeoUpsertBatch.model_validate(
        {
            "batch_id": "b",
            "rows": [geo_row("8.8.8.8", "US"), geo_row("9.9.9.9")],
            "retried": ["9.9.9.9"],
            "seen": {"at": seen_at, "ips": ["1.1.1.1", "2001:DB8::1"]},
        }
    )
    await on_geo_upsert_batch(batch, deps)
    assert repository.retried == ["9.9.9.9"]
    assert repository.seen == [Sightings(["1.1.1.1", "2001:db8::1"], seen_at)]
    assert repository.seen[0].day_start == "2027-01-15T00:00:00.000000Z"


async def test_a_batch_without_the_new_fields_is_applied_as_before(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    await on_geo_upsert_batch(GeoUpsertBatch(batch_id="b", rows=[geo_row("8.8.8.8", "US")]), deps)
    assert (repository.retried, repository.seen) == ([], [])
    assert list(repository.rows) == ["8.8.8.8"]


async def test_sightings_dated_in_the_future_are_refused_whole(
    deps: PersistenceDeps, repository: InMemoryGeoRepository
) -> None:
    ahead = iso_utc(WHEN + timedelta(seconds=MAX_CLOCK_SKEW_S + 60))
    batch = GeoUpsertBatch.model_validate(
        {
            "batch_id": "b",
            "rows": [geo_row("8.8.8.8", "US")],
            "seen": {"at": ahead, "ips": ["1.1.1.1"]},
        }
    )
    with pytest.raises(Rejected, match=r"seen\.at"):
        await on_geo_upsert_batch(batch, deps)
    assert repository.rows == {}
