"""The pure parts of warm answers and geo.lookup: known rows in the cache, the coalescing of
geo.known questions, reply rows in request order, and the deadline's pending rows."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from services.resolver.bootstrap import build_deps
from services.resolver.cache import GeoCache
from services.resolver.geo import FAILED, Geo
from services.resolver.handlers import ResolverDeps, on_ip_seen, on_retry_unresolved
from services.resolver.known import KnownBatcher, known_answers
from services.resolver.lookup_requests import answer_budget, on_geo_lookup, reply_rows
from shared.messages import GeoLookupRequest, GeoRow, IpSeen, Resolution, RetryUnresolved
from shared.settings import Settings
from tests.fakes import FakeAcker, FakeLookup, FakePublisher, FakeTicket, ManualClock

US = Geo("US", "United States", None, None, Resolution.RESOLVED, "embedded")
DE = Geo("DE", "Germany", None, None, Resolution.RESOLVED, "fake")
STAMP = "2026-11-22T12:01:26.519722Z"


@pytest.fixture(autouse=True)
def no_geo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GEO_"):
            monkeypatch.delenv(name)


def us_row(ip: str) -> GeoRow:
    return GeoRow(ip, Resolution.RESOLVED, STAMP, "US", "United States", None, None, "embedded")


def test_known_rows_are_cached_but_not_dirty() -> None:
    cache = GeoCache(10, 300)
    assert cache.put_known(known_answers([us_row("8.8.8.8")])) == 1
    assert cache.get("8.8.8.8", 0.0) == US
    assert cache.dirty_count == 0
    assert not cache.is_unpersisted("8.8.8.8")
    assert cache.cached_at("8.8.8.8") == STAMP


def test_a_known_row_never_replaces_a_newer_answer_but_replaces_a_failure() -> None:
    cache = GeoCache(10, 300)
    cache.put("1.1.1.1", DE, 100.0)
    cache.put("9.9.9.9", FAILED, 100.0)
    cache.confirm_flushed(cache.take_dirty())
    stored = cache.put_known(known_answers([us_row("1.1.1.1"), us_row("9.9.9.9")]))
    assert stored == 1
    assert cache.get("1.1.1.1", 101.0) == DE
    assert cache.get("9.9.9.9", 101.0) == US
    assert cache.negative_count == 0


def test_a_failed_row_is_no_known_answer() -> None:
    failed = GeoRow("9.9.9.9", Resolution.FAILED, STAMP, provider="embedded")
    assert known_answers([failed]) == []


def test_reply_rows_follow_the_request_order_with_duplicates_and_pending() -> None:
    cache = GeoCache(10, 300)
    cache.put_known(known_answers([us_row("8.8.8.8")]))
    cache.put("10.0.0.1", Geo(None, None, None, None, Resolution.NOT_GLOBAL, None), 0.0)
    body = reply_rows(["10.0.0.1", "8.8.8.8", "1.2.3.4", "8.8.8.8"], cache, {"1.2.3.4"})
    rows = json.loads(body)["rows"]
    assert [r[0] for r in rows] == ["10.0.0.1", "8.8.8.8", "1.2.3.4", "8.8.8.8"]
    assert rows[0][:2] == ["10.0.0.1", "not_global"]
    assert rows[0][2] == "1970-01-01T00:00:00.000000Z"
    assert rows[1] == list(us_row("8.8.8.8"))
    assert rows[2] == ["1.2.3.4", "pending", None, None, None, None, None, None]
    assert rows[3] == rows[1]


def test_the_answer_budget_keeps_a_margin_for_the_reply() -> None:
    assert answer_budget(2000) == pytest.approx(1.9)
    assert answer_budget(500) == pytest.approx(0.45)
    assert answer_budget(1) == pytest.approx(0.0009)


class Persistence:
    """geo.known answered from a table, counting questions; ``silent`` never answers."""

    def __init__(self, rows: dict[str, GeoRow], *, silent: bool = False) -> None:
        self.rows = rows
        self.silent = silent
        self.questions: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def ask(self, body: bytes, wait: float) -> bytes | None:
        ips = json.loads(body)["ips"]
        self.questions.append(ips)
        await self.gate.wait()
        if self.silent:
            return None
        found = [list(self.rows[ip]) for ip in ips if ip in self.rows]
        return json.dumps({"rows": found}).encode()


async def test_misses_of_concurrent_deliveries_are_asked_together() -> None:
    persistence = Persistence({"8.8.8.8": us_row("8.8.8.8")})
    batcher = KnownBatcher(persistence.ask, timeout=1.0, max_in_flight=1)
    persistence.gate.clear()
    first = asyncio.create_task(batcher.rows(["1.1.1.1"]))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(batcher.rows([f"2.2.2.{i}", "8.8.8.8"])) for i in range(50)]
    await asyncio.sleep(0)
    persistence.gate.set()
    assert await first == []
    answers = await asyncio.gather(*waiting)
    assert answers == [[us_row("8.8.8.8")]] * 50
    assert len(persistence.questions) == 2  # the first alone, then all 50 in one question
    assert len(persistence.questions[1]) == 51  # distinct IPs


async def test_a_silent_persistence_falls_back_and_is_not_asked_for_a_while() -> None:
    persistence = Persistence({}, silent=True)
    now = [0.0]
    batcher = KnownBatcher(persistence.ask, 1.0, quiet_after_timeout=30, clock=lambda: now[0])
    assert await batcher.rows(["8.8.8.8"]) == []
    assert await batcher.rows(["8.8.8.8"]) == []
    assert len(persistence.questions) == 1
    now[0] = 31.0
    await batcher.rows(["8.8.8.8"])
    assert len(persistence.questions) == 2
    assert batcher.timeouts == 2


def resolver(persistence: Persistence, lookup: FakeLookup) -> tuple[ResolverDeps, FakeAcker]:
    acker = FakeAcker()
    known = KnownBatcher(persistence.ask, 1.0)
    deps = build_deps(
        Settings(),
        lookup=lookup,
        publisher=FakePublisher(),
        acker=acker,
        clock=ManualClock(),
        known=known,
    )
    return deps, acker


async def test_a_known_ip_costs_no_lookup_and_is_acked_at_once() -> None:
    persistence = Persistence({"8.8.8.8": us_row("8.8.8.8")})
    lookup = FakeLookup({"1.1.1.1": DE})
    deps, acker = resolver(persistence, lookup)
    await on_ip_seen(IpSeen(ips=["8.8.8.8"]), FakeTicket("a"), deps)
    assert lookup.looked_up == []
    assert acker.acked == [FakeTicket("a")]
    await on_ip_seen(IpSeen(ips=["8.8.8.8", "1.1.1.1"]), FakeTicket("b"), deps)
    assert lookup.looked_up == ["1.1.1.1"]
    assert [e.ip for e in deps.cache.take_dirty()] == ["1.1.1.1"]


async def test_a_lookup_answers_from_cache_and_known_rows_and_pending_past_the_deadline() -> None:
    persistence = Persistence({"8.8.8.8": us_row("8.8.8.8")})
    slow = asyncio.Event()

    class SlowLookup(FakeLookup):
        async def lookup(self, ips: list[str]) -> dict[str, Geo]:  # type: ignore[override]
            await slow.wait()
            return {ip: DE for ip in ips}

    deps, _ = resolver(persistence, SlowLookup({}))
    request = GeoLookupRequest(ips=["1.1.1.1", "8.8.8.8", "10.0.0.1"], timeout_ms=50)
    rows = json.loads(await on_geo_lookup(request, deps))["rows"]
    assert [r[1] for r in rows] == ["pending", "resolved", "pending"]
    assert rows[1] == list(us_row("8.8.8.8"))
    slow.set()
    await asyncio.gather(*deps.state.lookups_running)
    assert deps.cache.get("1.1.1.1", 0.0) == DE  # still resolved, and dirty for the next flush
    assert {e.ip for e in deps.cache.take_dirty()} == {"1.1.1.1", "10.0.0.1"}


async def test_a_failed_refresh_keeps_the_old_answer() -> None:
    persistence = Persistence({})
    lookup = FakeLookup({"1.1.1.1": DE})
    deps, _ = resolver(persistence, lookup)
    deps.cache.put_known(known_answers([us_row("8.8.8.8")]))
    retry = RetryUnresolved(tick_id="re_resolve:1", ips=["8.8.8.8", "1.1.1.1"], refresh=True)
    await on_retry_unresolved(retry, FakeTicket("r"), deps)
    assert lookup.looked_up == ["8.8.8.8", "1.1.1.1"]
    assert deps.cache.get("8.8.8.8", 0.0) == US  # no answer: the old one stays, nothing dirty
    assert [(e.ip, e.geo) for e in deps.cache.take_dirty()] == [("1.1.1.1", DE)]
