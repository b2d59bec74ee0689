"""Sightings for ``geo_cache.last_seen``: what the resolver's cache notes per flush window, and
the ``geo.upsert`` bodies a flush makes of it (``retried`` on row batches, ``seen`` batches with
a carrier row), through the real handlers with in-memory fakes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from services.resolver.cache import MAX_SIGHTINGS, GeoCache
from services.resolver.geo import FAILED
from services.resolver.handlers import flush, on_retry_unresolved
from shared import topology
from shared.decode import decode
from shared.messages import (
    CheckedRows,
    GeoUpsertBatch,
    Resolution,
    RetryUnresolved,
    iso_utc_from_epoch,
)
from tests.fakes import FakeTicket
from tests.resolver_support import US, make_resolver

T0 = 1_800_000_000.0


def test_a_hit_is_a_sighting_and_a_new_row_is_its_own() -> None:
    cache = GeoCache(max_entries=100, negative_ttl=300.0)
    cache.put("8.8.8.8", US, T0)
    cache.confirm_flushed(cache.take_dirty())
    cache.take_sightings()
    cache.put("1.1.1.1", US, T0)  # looked up because it was seen: its row says so
    cache.note_seen(["8.8.8.8", "1.1.1.1", "8.8.8.8"])
    cache.take_dirty()
    sightings = cache.take_sightings()
    assert sightings.seen == ["8.8.8.8"]
    assert sightings.retried == frozenset()
    assert cache.take_sightings().seen == []  # emptied: one window per flush


def test_a_retried_row_is_not_a_sighting_unless_the_ip_was_seen_too() -> None:
    cache = GeoCache(max_entries=100, negative_ttl=300.0)
    cache.note_retried(["9.9.9.9", "4.4.4.4"])
    cache.put("9.9.9.9", FAILED, T0)
    cache.put("4.4.4.4", FAILED, T0)
    cache.note_seen(["4.4.4.4"])
    cache.take_dirty()
    sightings = cache.take_sightings()
    assert sightings.retried == {"9.9.9.9", "4.4.4.4"}
    assert sightings.seen == ["4.4.4.4"]  # its row is a retry's, so the sighting goes apart


def test_sightings_are_bounded_per_window_not_per_entry() -> None:
    cache = GeoCache(max_entries=100, negative_ttl=300.0)
    many = [f"11.0.{i // 250}.{i % 250}" for i in range(MAX_SIGHTINGS + 500)]
    cache.note_seen(many[:MAX_SIGHTINGS])
    cache.note_seen(many[MAX_SIGHTINGS:])
    assert cache.sightings_dropped == 500
    cache.take_dirty()
    assert len(cache.take_sightings().seen) == MAX_SIGHTINGS


async def test_a_flush_sends_hits_as_a_seen_batch_with_an_unchanged_carrier_row() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8")
    await flush(r.deps, trigger="test")
    first = r.batches()[0].rows[0]
    r.clock.advance(3600)
    await r.seen("8.8.8.8")  # a hit: no lookup, no row of its own
    await flush(r.deps, trigger="test")
    (batch,) = r.batches()[1:]
    assert batch.seen is not None
    assert batch.seen.ips == ["8.8.8.8"]
    assert batch.seen.at == iso_utc_from_epoch(r.clock())
    assert batch.rows == [first]  # the row as persistence already holds it
    assert batch.retried == []
    assert len(r.lookup.calls) == 1


async def test_retried_rows_are_named_in_their_batch() -> None:
    r = make_resolver()
    await r.seen("9.9.9.9")  # unknown to the fake lookup: failed
    await flush(r.deps, trigger="test")
    r.clock.advance(600)
    await r.retry("9.9.9.9")
    await flush(r.deps, trigger="test")
    batch = r.batches()[-1]
    assert [row.ip for row in batch.rows] == ["9.9.9.9"]
    assert batch.rows[0].resolution is Resolution.FAILED
    assert batch.retried == ["9.9.9.9"]
    assert batch.seen is None


async def test_a_failed_flush_keeps_its_sightings_for_the_next() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8")
    await flush(r.deps, trigger="test")
    await r.seen("8.8.8.8")
    r.publisher.fail_next = RuntimeError("broker gone")
    with pytest.raises(RuntimeError):
        await flush(r.deps, trigger="test")
    await flush(r.deps, trigger="test")
    seen = [b.seen for b in r.batches() if b.seen is not None]
    assert [s.ips for s in seen] == [["8.8.8.8"]]


async def test_the_bodies_pass_persistences_decoding_old_and_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = make_resolver()
    raw: list[tuple[str, bytes]] = []
    recorded = r.publisher.publish_bodies

    async def capture(routing_key: str, bodies: Sequence[bytes], **options: Any) -> None:
        raw.extend((routing_key, body) for body in bodies)
        await recorded(routing_key, bodies, **options)

    monkeypatch.setattr(r.publisher, "publish_bodies", capture)
    await r.seen("8.8.8.8", "1.1.1.1")
    await flush(r.deps, trigger="test")
    await r.seen("8.8.8.8")
    await r.retry("9.9.9.9")
    await flush(r.deps, trigger="test")
    bodies = [b for key, b in raw if key == topology.UPSERT][1:]
    assert len(bodies) == 2  # the retried row's batch, then the sightings batch
    for body in bodies:
        batch = decode(GeoUpsertBatch, body, 1_048_576)
        legacy = decode(LegacyBatch, body, 1_048_576)  # a persistence without the new fields
        assert legacy.rows == batch.rows
    assert decode(GeoUpsertBatch, bodies[0], 1_048_576).retried == ["9.9.9.9"]
    sighted = decode(GeoUpsertBatch, bodies[1], 1_048_576).seen
    assert sighted is not None
    assert sighted.ips == ["8.8.8.8"]


class LegacyBatch(BaseModel):
    """``GeoUpsertBatch`` as a persistence that predates ``retried`` and ``seen`` reads it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    batch_id: str
    rows: CheckedRows = Field(min_length=1, max_length=1000)


def test_a_flood_of_one_address_does_not_crowd_out_the_other_sightings() -> None:
    """The bound counted mentions, not addresses: 50 ip.seen of one IP 1000 times (a forged
    stream, or one IP banned in every jail) filled the window, and every other IP seen in it
    lost its sighting, so prune deleted rows of IPs still being seen."""
    cache = GeoCache(max_entries=100, negative_ttl=300.0)
    for _ in range(MAX_SIGHTINGS // 1000 + 5):
        cache.note_seen(["11.0.0.1"] * 1000)
    cache.note_seen(["8.8.8.8"])
    assert cache.sightings_dropped == 0
    cache.take_dirty()
    assert cache.take_sightings().seen == ["11.0.0.1", "8.8.8.8"]


def test_a_window_full_of_distinct_addresses_is_compacted_once_not_per_delivery() -> None:
    cache = GeoCache(max_entries=100, negative_ttl=300.0)
    many = [f"11.0.{i // 250}.{i % 250}" for i in range(MAX_SIGHTINGS)]
    cache.note_seen(many)
    for _ in range(100):
        cache.note_seen(["8.8.8.8"])
    assert cache.sightings_dropped == 100
    assert cache.sighting_compactions == 1
    cache.take_dirty()
    assert len(cache.take_sightings().seen) == MAX_SIGHTINGS
    cache.note_seen(many)  # a new window compacts again when it fills
    cache.note_seen(["8.8.8.8"])
    assert cache.sighting_compactions == 2


@pytest.mark.parametrize(
    "ips",
    [
        ("8.8.8.8", "1.1.1.1"),
        # Private addresses too: no provider looks them up, so a refresh cannot bring them
        # back; the retry writes their not_global row again.
        ("8.8.8.8", "10.0.0.1", "192.168.1.1"),
    ],
)
async def test_a_pruned_ip_seen_again_gets_its_row_back(
    tmp_path: Any, ips: tuple[str, ...]
) -> None:
    """README, Retention: "A pruned IP seen again is looked up again", even by a resolver that
    still caches it (a hit, which writes no row): persistence finds the sighted IP has no row
    and sends it back as a retry and a refresh, and the resolver writes the row again."""
    from services.persistence.handlers import PersistenceDeps, on_geo_upsert_batch
    from services.persistence.repository import SqliteGeoRepository
    from tests.fakes import FakePublisher

    r = make_resolver()
    repository = await SqliteGeoRepository.open(tmp_path / "geo.sqlite3")
    to_resolver = FakePublisher()
    persistence = PersistenceDeps(repository=repository, publisher=to_resolver, clock=r.clock)
    applied = 0

    async def deliver() -> None:  # the resolver's geo.upsert to persistence, and back
        nonlocal applied
        batches = r.batches()
        for batch in batches[applied:]:
            await on_geo_upsert_batch(batch, persistence)
        applied = len(batches)

    try:
        await r.seen(*ips)
        await flush(r.deps, trigger="test")
        await deliver()
        assert await repository.prune(iso_utc_from_epoch(r.clock() + 86_400), 2000) == len(ips)
        r.clock.advance(3600)
        await r.seen(*ips)  # banned again: all hits in the resolver's cache
        await flush(r.deps, trigger="test")
        await deliver()
        retries = to_resolver.on(topology.RETRY)
        asked = {ip for m in retries for ip in getattr(m, "ips", [])}
        assert asked  # (the seen batch's carrier row brought one of the two back by itself)
        assert asked <= set(ips)
        assert {getattr(m, "refresh", None) for m in retries} == {False, True}
        for retry in retries:
            assert isinstance(retry, RetryUnresolved)
            await on_retry_unresolved(retry, FakeTicket("r"), r.deps)
        await flush(r.deps, trigger="test")
        await deliver()
        assert len(await repository.known_rows(list(ips))) == len(ips)
    finally:
        await repository.close()
