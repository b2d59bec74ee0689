"""A resolver that restarts learns what geo_cache knows from persistence over the broker: the
same IPs published again cost no provider lookup, no ip-api request and no row rewrite."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    non_global_ips,
    publish,
    ready_count,
    wait_for_topology,
)
from bangui_geo.testing.http import free_port, scraped
from bangui_geo.testing.ipapi_standin import IpApiStandIn, ThreadedStandIn
from bangui_geo.testing.ips import known_public_ips

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in() -> Iterator[ThreadedStandIn]:
    with ThreadedStandIn(IpApiStandIn(requests_per_window=1000, window=1.0)) as api:
        yield api


def bodies(ips: list[str]) -> list[dict[str, Any]]:
    """A few hundred singles, the rest in lists of 100: fail2ban bans and a bulk import."""
    out: list[dict[str, Any]] = [{"ip": ip} for ip in ips[:300]]
    return out + [{"ips": ips[i : i + 100]} for i in range(300, len(ips), 100)]


async def test_known_ips_cost_no_lookup_and_no_rewrite_after_a_kill(
    service_group: ServiceGroup, stand_in: ThreadedStandIn
) -> None:
    amqp_url = service_group.amqp_url
    port = free_port()
    service_group.env.update(
        GEO_PROVIDER="ip-api",
        GEO_IPAPI_URL=stand_in.url,
        GEO_IPAPI_REQUESTS_PER_WINDOW="1000",
        GEO_IPAPI_WINDOW="1",
    )
    ips = known_public_ips(9_900, seed=41) + non_global_ips(100, seed=43)
    service_group.start("persistence")
    service_group.start("timer")
    first = service_group.start("resolver")
    await wait_for_topology(amqp_url)
    await publish(amqp_url, "ip.seen", bodies(ips))

    async def all_stored() -> bool:
        return len(service_group.rows()) == len(ips)

    await async_poll(all_stored, deadline_s=60, what="10,000 rows")
    requests_before = len(stand_in.records())
    assert requests_before > 0
    before = service_group.rows()
    assert {r[5] for r in before.values()} == {"resolved", "not_global"}
    first.kill()  # SIGKILL: nothing of its memory survives

    again = service_group.start("resolver", GEO_METRICS_PORT=str(port))
    await publish(amqp_url, "ip.seen", bodies(ips))

    async def all_answered() -> bool:
        hits = scraped(port, "geo_known_hits_total")
        idle = await ready_count(amqp_url, "geo.resolver.ip_seen") == 0
        return hits == len(ips) and idle and scraped(port, "geo_deliveries_held") == 0

    await async_poll(all_answered, deadline_s=60, what="every IP answered from geo_cache")
    assert scraped(port, "geo_lookups_total") == 0
    assert scraped(port, "geo_cache_entries") == len(ips)
    assert scraped(port, "geo_cache_dirty") == 0
    assert service_group.stop_all() == {"timer": 0, "resolver": 0, "persistence": 0}
    assert len(stand_in.records()) == requests_before  # not one more ip-api request
    assert service_group.rows() == before  # every row as it was, cached_at included
    flushed = [e for e in again.log_events() if e.get("event") == "geo_cache_flush_ran"]
    assert sum(e["rows"] for e in flushed) == 0
