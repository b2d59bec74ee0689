"""Resolver handlers through ``build_deps`` with in-memory fakes: what is looked up, what is
flushed to persistence, and when a held delivery is acked."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

import pytest

from services.resolver.geo import FAILED, NOT_GLOBAL, Geo
from services.resolver.handlers import (
    ResolverDeps,
    flush,
    flush_watchdog,
    on_flush_dirty,
)
from shared import topology
from shared.errors import Transient
from shared.messages import (
    FlushDirty,
    GeoUpsertBatch,
    IpResolved,
    Resolution,
    iso_utc,
)
from tests.resolver_support import US, make_resolver


@pytest.fixture(autouse=True)
def no_geo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GEO_"):
            monkeypatch.delenv(name)


def tick(tick_id: str) -> FlushDirty:
    return FlushDirty(tick_id=tick_id, issued_at=datetime.now(UTC))


async def test_answer_is_flushed_as_a_row() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8")
    assert await flush(r.deps, trigger="test") == 1
    row = r.rows()["8.8.8.8"]
    assert (row.country_code, row.country_name, row.asn, row.org) == (
        "US",
        "United States",
        "AS15169",
        "Google LLC",
    )
    assert row.resolution is Resolution.RESOLVED
    assert row.provider == "fake"
    assert row.cached_at == iso_utc(datetime.fromtimestamp(r.clock.now, UTC))


async def test_published_batches_are_valid_on_the_wire() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", "10.0.0.1", "9.9.9.9")
    await flush(r.deps, trigger="test")
    (batch,) = r.batches()
    again = GeoUpsertBatch.model_validate_json(batch.model_dump_json())
    assert again == GeoUpsertBatch.model_validate(batch.model_dump())
    assert {row.ip for row in again.rows} == {"8.8.8.8", "10.0.0.1", "9.9.9.9"}


async def test_cached_ip_costs_no_lookup() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", ticket="a")
    await flush(r.deps, trigger="test")
    await r.seen("8.8.8.8", ticket="b")
    await r.seen("8.8.8.8", "8.8.8.8", ticket="c")
    assert r.lookup.calls == [["8.8.8.8"]]
    assert r.deps.cache.hits >= 2


async def test_one_event_looks_up_each_new_ip_once() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", "1.1.1.1", "8.8.8.8", "::ffff:8.8.8.8")
    assert r.lookup.calls == [["8.8.8.8", "1.1.1.1"]]


async def test_private_ips_never_reach_the_lookup_and_are_stored_not_global() -> None:
    r = make_resolver()
    await r.seen("10.0.0.1", "192.168.1.1", "::1", "8.8.8.8")
    await r.seen("100.64.0.1")
    assert r.lookup.looked_up == ["8.8.8.8"]
    assert r.deps.cache.get("10.0.0.1", r.clock()) is NOT_GLOBAL
    await flush(r.deps, trigger="test")
    rows = r.rows()
    for ip in ("10.0.0.1", "192.168.1.1", "::1", "100.64.0.1"):
        assert rows[ip].resolution is Resolution.NOT_GLOBAL
        assert rows[ip].country_code is None
    assert rows["8.8.8.8"].country_code == "US"


async def test_missing_answer_becomes_a_failed_null_row_and_is_negatively_cached() -> None:
    r = make_resolver()
    await r.seen("9.9.9.9")  # the fake lookup does not know it
    assert r.deps.cache.get("9.9.9.9", r.clock()) is FAILED
    assert r.deps.cache.negative_count == 1
    await flush(r.deps, trigger="test")
    row = r.rows()["9.9.9.9"]
    assert (row.country_code, row.country_name, row.resolution) == (None, None, Resolution.FAILED)


async def test_lookup_that_raises_fails_every_routable_ip_and_loses_none() -> None:
    r = make_resolver()
    r.lookup.broken = True
    ticket = await r.seen("8.8.8.8", "1.1.1.1", "10.0.0.1")
    assert r.deps.cache.negative_count == 2
    await flush(r.deps, trigger="test")
    rows = r.rows()
    assert rows["8.8.8.8"].resolution is Resolution.FAILED
    assert rows["8.8.8.8"].country_code is None
    assert rows["1.1.1.1"].resolution is Resolution.FAILED
    assert rows["10.0.0.1"].resolution is Resolution.NOT_GLOBAL
    assert r.acker.acked == [ticket]


async def test_failure_is_not_looked_up_again_until_the_negative_ttl_passes() -> None:
    r = make_resolver(negative_ttl=300.0)
    await r.seen("9.9.9.9", ticket="a")
    await flush(r.deps, trigger="test")
    r.clock.advance(299)
    await r.seen("9.9.9.9", ticket="b")
    assert r.lookup.looked_up == ["9.9.9.9"]
    r.clock.advance(2)
    await r.seen("9.9.9.9", ticket="c")
    assert r.lookup.looked_up == ["9.9.9.9", "9.9.9.9"]


async def test_delivery_is_held_until_the_flush_publishes_then_acked() -> None:
    r = make_resolver()
    first = await r.seen("8.8.8.8", ticket="a")
    second = await r.seen("1.1.1.1", "8.8.8.8", ticket="b")
    assert r.acker.acked == []
    assert r.deps.state.held == [first, second]
    assert r.publisher.published == []
    await flush(r.deps, trigger="test")
    assert len(r.batches()) == 1
    assert r.acker.acked == [first, second]
    assert r.deps.state.held == []


async def test_delivery_whose_ips_are_all_persisted_is_acked_at_once() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", "10.0.0.1", ticket="a")
    await flush(r.deps, trigger="test")
    again = await r.seen("10.0.0.1", "8.8.8.8", ticket="b")
    assert r.acker.acked[-1] == again
    assert r.deps.state.held == []


async def test_delivery_is_held_while_its_ip_is_still_dirty_from_another() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", ticket="a")
    cached_but_dirty = await r.seen("8.8.8.8", ticket="b")
    assert cached_but_dirty not in r.acker.acked
    assert r.lookup.calls == [["8.8.8.8"]]


async def test_flush_publishes_batches_of_at_most_1000_rows() -> None:
    r = make_resolver()
    addresses = [f"11.0.{i // 256}.{i % 256}" for i in range(2500)]
    for n, start in enumerate(range(0, 2500, 1000)):
        await r.seen(*addresses[start : start + 1000], ticket=f"t{n}")
    assert await flush(r.deps, trigger="test") == 2500
    batches = r.batches()
    assert [len(b.rows) for b in batches] == [1000, 1000, 500]
    assert len({b.batch_id for b in batches}) == 3
    assert sorted(r.rows()) == sorted(addresses)
    assert len(r.acker.acked) == 3
    assert r.deps.state.rows_flushed == 2500


async def test_a_flush_goes_out_in_ip_order_across_its_batches() -> None:
    """Each geo.upsert then covers a narrow slice of geo_cache's primary-key index."""
    r = make_resolver()
    addresses = [f"{1 + i % 200}.{i % 7}.{i // 7 % 256}.{i % 251}" for i in range(2500)]
    for n, start in enumerate(range(0, 2500, 1000)):
        await r.seen(*addresses[start : start + 1000], ticket=f"t{n}")
    await flush(r.deps, trigger="test")
    flushed = [row.ip for batch in r.batches() for row in batch.rows]
    assert flushed == sorted(set(addresses))
    assert flushed != list(dict.fromkeys(addresses))  # the arrival order was another


async def test_flush_with_nothing_dirty_publishes_nothing() -> None:
    r = make_resolver()
    assert await flush(r.deps, trigger="test") == 0
    assert r.publisher.published == []


async def test_publish_failure_keeps_entries_dirty_and_tickets_held() -> None:
    r = make_resolver()
    ticket = await r.seen("8.8.8.8", "9.9.9.9")
    r.publisher.fail_next = Transient("publish to geo.upsert not confirmed")
    with pytest.raises(Transient):
        await on_flush_dirty(tick("flush:1.000"), r.deps)
    assert r.deps.cache.dirty_count == 2
    assert r.deps.cache.is_unpersisted("8.8.8.8")
    assert r.deps.state.held == [ticket]
    assert r.acker.acked == []
    # The redelivered tick is not a duplicate: it was never done.
    await on_flush_dirty(tick("flush:1.000"), r.deps)
    assert set(r.rows()) == {"8.8.8.8", "9.9.9.9"}
    assert r.acker.acked == [ticket]
    assert r.deps.cache.dirty_count == 0
    assert not r.deps.cache.is_unpersisted("8.8.8.8")


async def test_answer_arriving_during_a_failed_flush_is_kept() -> None:
    r = make_resolver()
    first = await r.seen("8.8.8.8", ticket="a")
    r.publisher.fail_next = Transient("no confirm")
    with pytest.raises(Transient):
        await flush(r.deps, trigger="test")
    second = await r.seen("1.1.1.1", ticket="b")
    await flush(r.deps, trigger="test")
    assert set(r.rows()) == {"8.8.8.8", "1.1.1.1"}
    assert r.acker.acked == [first, second]


async def test_duplicate_flush_tick_is_ignored() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", ticket="a")
    await on_flush_dirty(tick("flush:1.000"), r.deps)
    late = await r.seen("1.1.1.1", ticket="b")
    await on_flush_dirty(tick("flush:1.000"), r.deps)
    assert len(r.batches()) == 1
    assert late not in r.acker.acked
    await on_flush_dirty(tick("flush:2.000"), r.deps)
    assert len(r.batches()) == 2
    assert late in r.acker.acked
    assert r.deps.state.flushes == 2


async def test_retry_looks_up_failed_ips_again_within_the_negative_ttl() -> None:
    answers: dict[str, Geo] = {}
    r = make_resolver(answers, negative_ttl=3600.0)
    await r.seen("8.8.8.8", ticket="a")
    await flush(r.deps, trigger="test")
    answers["8.8.8.8"] = US  # the provider knows it now
    r.clock.advance(10)
    ticket = await r.retry("8.8.8.8", "10.0.0.1")
    assert r.lookup.calls == [["8.8.8.8"], ["8.8.8.8"]]
    assert ticket not in r.acker.acked  # its answer is not persisted yet
    await flush(r.deps, trigger="test")
    rows = [row for b in r.batches()[1:] for row in b.rows]
    assert {row.ip: row.resolution for row in rows} == {
        "8.8.8.8": Resolution.RESOLVED,
        "10.0.0.1": Resolution.NOT_GLOBAL,
    }
    assert ticket in r.acker.acked


async def test_retry_of_an_unflushed_failure_looks_it_up_and_flushes_the_new_answer() -> None:
    answers: dict[str, Geo] = {}
    r = make_resolver(answers)
    await r.seen("8.8.8.8", ticket="a")
    answers["8.8.8.8"] = US
    await r.retry("8.8.8.8")
    await flush(r.deps, trigger="test")
    assert r.rows()["8.8.8.8"].country_code == "US"
    assert len(r.lookup.calls) == 2


async def test_retry_does_not_look_up_resolved_ips() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", ticket="a")
    await flush(r.deps, trigger="test")
    ticket = await r.retry("8.8.8.8")
    assert r.lookup.calls == [["8.8.8.8"]]
    assert r.acker.acked[-1] == ticket


async def settle_background(deps: ResolverDeps) -> None:
    await asyncio.gather(*list(deps.state.background))


async def test_early_flush_when_held_deliveries_reach_the_hold_limit() -> None:
    r = make_resolver(prefetch=6)  # hold_limit = 3
    assert r.deps.hold_limit == 3
    a = await r.seen("8.8.8.8", ticket="a")
    b = await r.seen("1.1.1.1", ticket="b")
    assert not r.deps.state.background
    c = await r.seen("9.9.9.9", ticket="c")
    assert r.deps.state.background
    await settle_background(r.deps)
    assert set(r.rows()) == {"8.8.8.8", "1.1.1.1", "9.9.9.9"}
    assert r.acker.acked == [a, b, c]
    assert r.deps.state.held == []


async def test_early_flush_when_the_dirty_set_reaches_its_bound() -> None:
    r = make_resolver(flush_max_dirty=3)
    ticket = await r.seen("8.8.8.8", "1.1.1.1", "10.0.0.1")
    await settle_background(r.deps)
    assert len(r.rows()) == 3
    assert r.acker.acked == [ticket]


async def test_failed_early_flush_keeps_everything_for_the_next_one() -> None:
    r = make_resolver(prefetch=2)  # hold_limit = 1
    r.publisher.fail_next = Transient("no confirm")
    ticket = await r.seen("8.8.8.8")
    await settle_background(r.deps)  # logged, not raised
    assert r.acker.acked == []
    assert r.deps.state.held == [ticket]
    assert r.deps.cache.dirty_count == 1
    await on_flush_dirty(tick("flush:5.000"), r.deps)
    assert set(r.rows()) == {"8.8.8.8"}
    assert r.acker.acked == [ticket]


async def test_flush_announces_ip_resolved_after_the_upserts_without_mandatory() -> None:
    r = make_resolver()
    await r.seen("8.8.8.8", "10.0.0.1")
    await flush(r.deps, trigger="test")
    keys = [key for key, _, _ in r.publisher.published]
    assert keys == [topology.UPSERT, topology.RESOLVED]
    (event,) = r.publisher.on(topology.RESOLVED)
    assert isinstance(event, IpResolved)
    assert event.rows == r.batches()[0].rows
    assert IpResolved.model_validate_json(event.model_dump_json()) == event
    assert r.publisher.mandatory == {topology.UPSERT: True, topology.RESOLVED: False}


async def test_ip_resolved_can_be_switched_off() -> None:
    r = make_resolver(publish_resolved=False)
    await r.seen("8.8.8.8")
    await flush(r.deps, trigger="test")
    assert r.publisher.on(topology.RESOLVED) == []
    assert len(r.batches()) == 1


async def test_a_full_dirty_set_makes_new_deliveries_wait_for_the_flush() -> None:
    answers = {ip: US for ip in ("8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9")}
    r = make_resolver(answers, flush_max_dirty=2)
    gate = asyncio.Event()
    publish = r.publisher.publish

    async def slow_publish(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await publish(*args, **kwargs)

    r.publisher.publish = slow_publish  # type: ignore[method-assign]
    await r.seen("8.8.8.8", "8.8.4.4", ticket="a")  # full: a flush starts and blocks
    for _ in range(3):
        await asyncio.sleep(0)  # the flush takes the dirty set, then waits on the gate
    await r.seen("1.1.1.1", "1.0.0.1", ticket="b")  # refills the dirty set meanwhile
    late = asyncio.create_task(r.seen("9.9.9.9", ticket="c"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not late.done()
    assert r.deps.cache.get("9.9.9.9", r.clock.now) is None  # not even looked up yet
    gate.set()
    await late
    flushed = [row.ip for batch in r.batches() for row in batch.rows]
    assert flushed == ["8.8.4.4", "8.8.8.8", "1.0.0.1", "1.1.1.1"]  # each flush in IP order
    assert r.deps.cache.dirty_count == 1  # 9.9.9.9, admitted once there was room
    assert [t.name for t in r.acker.acked] == ["a", "b"]  # type: ignore[attr-defined]


async def test_watchdog_flushes_when_no_flush_came_and_deliveries_wait() -> None:
    r = make_resolver()
    stop = asyncio.Event()
    watchdog = asyncio.create_task(flush_watchdog(r.deps, 0.05, stop))
    await r.seen("8.8.8.8", ticket="held")
    assert r.acker.acked == []

    for _ in range(500):  # poll with a deadline (5 s)
        if r.batches():
            break
        await asyncio.sleep(0.01)
    assert r.batches(), "the watchdog never flushed"
    assert [t.name for t in r.acker.acked] == ["held"]  # type: ignore[attr-defined]
    published = len(r.publisher.published)
    await asyncio.sleep(0.2)  # nothing waits now: the watchdog stays quiet
    assert len(r.publisher.published) == published
    stop.set()
    await asyncio.wait_for(watchdog, timeout=1)
