"""The ip-api provider against the stand-in over real loopback HTTP (no broker, no mocks):
coalescing, the documented limits, final and retryable failures, outages and recovery."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from bangui_geo.testing.ipapi_standin import IpApiStandIn, Outage, answer_for, expected_geo
from bangui_geo.testing.ips import known_public_ips as public_ips
from bangui_geo.testing.ips import non_global_ips
from services.resolver.bootstrap import build_lookup
from services.resolver.geo import Geo
from services.resolver.lookup import ProviderChain
from services.resolver.providers.ipapi import IpApiProvider, parse_batch
from shared.ipnorm import is_routable
from shared.messages import Resolution
from shared.settings import Settings


@asynccontextmanager
async def serving(api: IpApiStandIn, **options: Any) -> AsyncIterator[IpApiProvider]:
    async with api:
        provider = IpApiProvider(api.url, **options)
        try:
            yield provider
        finally:
            await provider.close()


def expected_answers(ips: list[str]) -> dict[str, Geo]:
    return {ip: geo for ip in ips if (geo := expected_geo(ip)) is not None}


async def eventually(provider: IpApiProvider, ips: list[str], want: Mapping[str, Geo]) -> None:
    deadline = time.monotonic() + 5.0
    got: Mapping[str, Geo] = {}
    while time.monotonic() < deadline:
        got = await provider.lookup(ips)
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"lookups never recovered; last answered {len(got)} of {len(want)}")


async def test_burst_of_5000_is_coalesced_into_full_batches_within_the_limit() -> None:
    public = public_ips(4_500)
    private = non_global_ips(500)
    ips = public + private
    random.Random(1).shuffle(ips)
    rng = random.Random(2)
    calls: list[tuple[float, list[str]]] = []  # (arrival, IPs)
    i = 0
    while i < len(ips):  # small calls, as the resolver makes one per ip.seen delivery
        size = rng.randint(1, 10)
        at = i / len(ips) * 0.5  # deliveries arrive over half a second
        calls.append((at, ips[i : i + size]))
        if rng.random() < 0.2:  # another delivery with some of the same IPs, at the same time
            calls.append((at, rng.sample(calls[-1][1], 1) + rng.sample(public, 1)))
        i += size

    api = IpApiStandIn(requests_per_window=15, window=1.0)
    async with serving(api, requests_per_window=15, window=1.0) as provider:

        async def deliver(at: float, chunk: list[str]) -> Mapping[str, Geo]:
            await asyncio.sleep(at)
            return await provider.lookup(chunk)

        started = time.monotonic()
        results = await asyncio.gather(*(deliver(at, chunk) for at, chunk in calls))
        elapsed = time.monotonic() - started

    wanted = set(public)
    for (_, chunk), got in zip(calls, results, strict=True):
        assert got == {ip: expected_geo(ip) for ip in chunk if ip in wanted}
    sent = api.ips_sent()
    print(  # request counts and batch fill; shown with pytest -s
        f"\nburst: {len(api.records)} requests, avg batch {api.average_batch():.1f}, "
        f"statuses {dict(api.statuses())}, {elapsed:.2f}s"
    )
    assert api.statuses() == {200: len(api.records)}  # zero 429, zero 422
    assert all(len(r.ips) <= 100 for r in api.records)
    assert api.average_batch() >= 90
    assert not [ip for ip in sent if not is_routable(ip)]  # no private IP ever sent
    # Each public IP sent once: a repeat asked while the first was in flight joined it, and
    # one asked after the answer came is the resolver cache's job, so the stand-in may see it.
    assert set(sent) == wanted
    assert len(sent) - len(wanted) <= 200 / 2
    assert not api.ttl_violations()


async def test_final_fail_answers_are_rejected_and_other_fails_are_left_out() -> None:
    ips = public_ips(40, seed=6)  # ips[5] is one of the nine in ten with an AS and org
    plain = next(ip for ip in ips if answer_for(ip)["as"] == "")
    overrides = {
        ips[0]: "reserved range",
        ips[1]: "private range",
        ips[2]: "invalid query",
        ips[3]: "quota",
    }
    async with serving(IpApiStandIn(overrides=overrides)) as provider:
        got = await provider.lookup(ips)
    rejected = Geo(None, None, None, None, Resolution.REJECTED, "ip-api")
    assert got[ips[0]] == got[ips[1]] == got[ips[2]] == rejected
    assert ips[3] not in got
    assert got[plain].asn is None
    assert got[plain].org is None
    assert got[plain].resolution is Resolution.RESOLVED
    regular = got[ips[5]]
    assert regular.asn is not None
    assert regular.asn.startswith("AS")
    assert regular.org is not None
    assert regular.org.startswith("Org ")
    assert regular.provider == "ip-api"
    assert {ip: expected_geo(ip, overrides) for ip in ips[3:]} == {
        **{ip: g for ip, g in got.items() if ip not in ips[:3]},
        ips[3]: None,
    }


async def test_x_rl_zero_holds_requests_until_x_ttl_even_when_our_budget_is_larger() -> None:
    # The server allows 4 a window while the client believes 15: only the headers save it.
    api = IpApiStandIn(requests_per_window=4, window=0.5, integer_ttl=False)
    ips = public_ips(1_000, seed=5)
    async with serving(api, requests_per_window=15, window=0.5) as provider:
        got = await provider.lookup(ips)
    assert len(got) == len(ips)
    assert api.statuses() == {200: 10}
    assert any(r.remaining == 0 for r in api.records)
    assert not api.ttl_violations()


async def test_429_is_logged_loudly_and_nothing_is_sent_until_x_ttl() -> None:
    api = IpApiStandIn(requests_per_window=5, window=0.6, integer_ttl=False)
    ips = public_ips(20, seed=9)
    with capture_logs() as logs:
        async with serving(api, requests_per_window=5, window=0.6) as provider:
            api.exhaust()  # another client behind our address used the window
            assert await provider.lookup(ips[:10]) == {}
            second = await provider.lookup(ips[10:])
    assert second == {ip: expected_geo(ip) for ip in ips[10:]}
    limited, answered = api.records
    assert (limited.status, answered.status) == (429, 200)
    assert limited.ttl is not None
    assert answered.at >= limited.at + limited.ttl
    event = next(e for e in logs if e["event"] == "ipapi_rate_limited")
    assert event["log_level"] == "error"
    assert event["ips"] == 10


@pytest.mark.parametrize("outage", [Outage.UNAVAILABLE, Outage.DROP, Outage.GARBAGE, Outage.HANG])
async def test_outage_leaves_ips_out_backs_off_and_recovers(outage: Outage) -> None:
    api = IpApiStandIn(requests_per_window=15, window=4.0, hang_s=3.0)
    ips = public_ips(60, seed=13)
    with capture_logs() as logs:
        # A 4 s window: the first backoff is 0.5-1 s, long enough to see the provider fail fast.
        async with serving(api, requests_per_window=15, window=4.0, timeout=0.3) as provider:
            api.outage = outage
            assert await provider.lookup(ips[:50]) == {}
            assert len(api.records) == 1
            # Backing off: fail fast, without a request.
            assert await provider.lookup(ips[50:]) == {}
            assert len(api.records) == 1
            api.outage = Outage.NONE
            await eventually(provider, ips, expected_answers(ips))
    failed = [e for e in logs if e["event"] == "ipapi_request_failed"]
    assert [e["ips"] for e in failed] == [50]
    assert 0.5 <= failed[0]["backoff_s"] <= 1.0
    assert api.records[1].at - api.records[0].at >= failed[0]["backoff_s"]


async def test_backoff_grows_while_the_outage_lasts() -> None:
    api = IpApiStandIn(requests_per_window=15, window=2.0)
    ips = public_ips(5, seed=17)
    api.outage = Outage.UNAVAILABLE
    with capture_logs() as logs:
        async with serving(api, window=2.0, jitter=lambda: 1.0) as provider:
            deadline = time.monotonic() + 10.0
            while len(api.records) < 3 and time.monotonic() < deadline:
                assert await provider.lookup(ips) == {}
                await asyncio.sleep(0.02)
    delays = [e["backoff_s"] for e in logs if e["event"] == "ipapi_request_failed"]
    assert delays[:3] == [0.5, 1.0, 2.0]  # base window/4, doubling, capped at the window
    gaps = [b.at - a.at for a, b in zip(api.records, api.records[1:], strict=False)]
    assert all(gap >= d for gap, d in zip(gaps, delays, strict=False))


async def test_a_waiting_ip_gives_up_after_max_wait_and_close_answers_the_rest() -> None:
    ips = public_ips(3, seed=19)
    async with serving(
        IpApiStandIn(), requests_per_window=1, window=30.0, max_wait=0.3
    ) as provider:
        assert len(await provider.lookup(ips[:1])) == 1  # the one request this window allows
        started = time.monotonic()
        assert await provider.lookup(ips[1:2]) == {}
        assert 0.3 <= time.monotonic() - started < 2.0
        waiting = asyncio.create_task(provider.lookup(ips[2:]))
        await asyncio.sleep(0.05)
        await provider.close()
        assert await asyncio.wait_for(waiting, 1.0) == {}


async def test_a_cancelled_caller_does_not_cancel_the_ip_for_others() -> None:
    ip = public_ips(1, seed=23)[0]
    async with serving(IpApiStandIn(), linger=0.2) as provider:
        first = asyncio.create_task(provider.lookup([ip]))
        second = asyncio.create_task(provider.lookup([ip]))
        await asyncio.sleep(0.05)
        first.cancel()
        assert await second == {ip: expected_geo(ip)}


async def test_the_stand_in_answers_422_above_100_and_only_the_fields_asked_for() -> None:
    async with IpApiStandIn() as api, aiohttp.ClientSession() as session:
        too_many = [f"8.8.{i // 256}.{i % 256}" for i in range(101)]
        async with session.post(f"{api.url}/batch", json=too_many) as response:
            assert response.status == 422
            assert response.headers["X-Rl"] == "14"  # refused, but it counts
        async with session.post(f"{api.url}/batch?fields=status,query", json=["8.8.8.8"]) as r:
            assert await r.json() == [{"status": "success", "query": "8.8.8.8"}]
            assert r.headers["X-Rl"] == "13"
            assert int(r.headers["X-Ttl"]) <= 60


def test_parse_batch_maps_answers_onto_what_was_sent() -> None:
    sent = ["2001:4860:4860::8888", "8.8.8.8", "1.1.1.1"]
    body = (
        b'[{"status":"success","query":"2001:4860:4860:0:0:0:0:8888","countryCode":"US",'
        b'"country":"United States","as":"AS15169 Google LLC","org":"Google Public DNS"},'
        b'{"status":"success","query":"8.8.8.8","countryCode":"","country":"","as":"","org":""},'
        b'{"status":"fail","query":"9.9.9.9","message":"reserved range"}]'
    )
    assert parse_batch(sent, body) == {
        "2001:4860:4860::8888": Geo(
            "US", "United States", "AS15169", "Google Public DNS", Resolution.RESOLVED, "ip-api"
        )
    }


def test_parse_batch_keeps_only_what_persistence_stores() -> None:
    # An unassigned code would get the geo.upsert dead-lettered: no answer, the IP is retried.
    sent = ["8.8.8.8", "1.1.1.1"]
    org = "Evil\u202e<script>" + "x" * 300
    body = (
        b'[{"status":"success","query":"8.8.8.8","countryCode":"ZZ","country":"Nowhere"},'
        b'{"status":"success","query":"1.1.1.1","countryCode":"AU","country":"Australia",'
        b'"as":"AS\\u0661\\u0662 x","org":"' + org.encode("unicode_escape") + b'"}]'
    )
    assert parse_batch(sent, body) == {
        "1.1.1.1": Geo(
            "AU", "Australia", None, ("Evilscript" + "x" * 300)[:200], Resolution.RESOLVED, "ip-api"
        )
    }


@pytest.mark.parametrize("body", [b"<html>", b'{"status":"success"}', b'[{"query":"1.1.1.1"}]'])
def test_parse_batch_rejects_what_is_not_a_batch_answer(body: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        parse_batch(["1.1.1.1"], body)


async def test_settings_choose_ip_api_and_its_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEO_PROVIDER", "ip-api,embedded")
    monkeypatch.setenv("GEO_IPAPI_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("GEO_IPAPI_REQUESTS_PER_WINDOW", "3")
    monkeypatch.setenv("GEO_IPAPI_WINDOW", "1.5")
    monkeypatch.setenv("GEO_IPAPI_TIMEOUT", "2")
    monkeypatch.setenv("GEO_IPAPI_MAX_WAIT", "30")
    settings = Settings()
    assert (settings.ipapi_requests_per_window, settings.ipapi_window) == (3, 1.5)
    assert (settings.ipapi_timeout, settings.ipapi_max_wait) == (2.0, 30.0)
    chain = build_lookup(settings)
    try:
        assert isinstance(chain, ProviderChain)
        assert [p.name for p in chain.providers] == ["ip-api", "embedded"]
        assert isinstance(chain.providers[0], IpApiProvider)
        # Nothing listens on port 9: ip-api fails, the IP is left out, embedded answers it.
        got = await chain.lookup(["8.8.8.8"])
        assert got["8.8.8.8"].provider == "embedded"
    finally:
        await chain.close()
