"""A resolver that restarts learns what geo_cache knows from persistence over the broker: the
same IPs published again cost no provider lookup, no ip-api request and no row rewrite."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceProcess,
    async_poll,
    publish,
    read_rows,
    ready_count,
    service_env,
    wait_for_topology,
)
from tests.ipapi_standin import IpApiStandIn, ThreadedStandIn, non_global_ips, public_ips

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in() -> Iterator[ThreadedStandIn]:
    with ThreadedStandIn(IpApiStandIn(requests_per_window=1000, window=1.0)) as api:
        yield api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def bodies(ips: list[str]) -> list[dict[str, Any]]:
    """A few hundred singles, the rest in lists of 100: fail2ban bans and a bulk import."""
    out: list[dict[str, Any]] = [{"ip": ip} for ip in ips[:300]]
    return out + [{"ips": ips[i : i + 100]} for i in range(300, len(ips), 100)]


async def test_known_ips_cost_no_lookup_and_no_rewrite_after_a_kill(
    amqp_url: str, tmp_path: Path, stand_in: ThreadedStandIn
) -> None:
    db_path = tmp_path / "geo_cache.sqlite3"
    port = free_port()
    env = service_env(
        amqp_url,
        db_path,
        GEO_PROVIDER="ip-api",
        GEO_IPAPI_URL=stand_in.url,
        GEO_IPAPI_REQUESTS_PER_WINDOW="1000",
        GEO_IPAPI_WINDOW="1",
    )
    ips = public_ips(9_900, seed=41) + non_global_ips(100, seed=43)
    persistence = ServiceProcess("persistence", env, tmp_path / "persistence.log")
    timer = ServiceProcess("timer", env, tmp_path / "timer.log")
    first = ServiceProcess("resolver", env, tmp_path / "resolver-1.log")
    again = ServiceProcess("resolver", dict(env, GEO_METRICS_PORT=str(port)), tmp_path / "r2.log")
    services = [persistence, timer, first]
    try:
        for service in services:
            service.start()
        await wait_for_topology(amqp_url)
        await publish(amqp_url, "ip.seen", bodies(ips))

        async def all_stored() -> bool:
            return len(read_rows(db_path)) == len(ips)

        await async_poll(all_stored, deadline_s=60, what="10,000 rows")
        requests_before = len(stand_in.records())
        assert requests_before > 0
        before = read_rows(db_path)
        assert {r[5] for r in before.values()} == {"resolved", "not_global"}
        first.kill()  # SIGKILL: nothing of its memory survives

        services.append(again.start())
        await publish(amqp_url, "ip.seen", bodies(ips))

        async def all_answered() -> bool:
            hits = metric(port, "geo_known_hits_total")
            idle = await ready_count(amqp_url, "geo.resolver.ip_seen") == 0
            return hits == len(ips) and idle and metric(port, "geo_deliveries_held") == 0

        await async_poll(all_answered, deadline_s=60, what="every IP answered from geo_cache")
        assert metric(port, "geo_lookups_total") == 0
        assert metric(port, "geo_cache_entries") == len(ips)
        assert metric(port, "geo_cache_dirty") == 0
        assert [s.stop() for s in services if s is not first] == [0, 0, 0]
    finally:
        for service in services:
            if service.running:
                service.kill()
    assert len(stand_in.records()) == requests_before  # not one more ip-api request
    assert read_rows(db_path) == before  # every row as it was, cached_at included
    flushed = [e for e in again.log_events() if e.get("event") == "geo_cache_flush_ran"]
    assert sum(e["rows"] for e in flushed) == 0
