"""ip-api end to end: the three services as subprocesses on a real broker, with
``GEO_PROVIDER=ip-api`` pointed at the stand-in (short window). IPs seen during an outage become
NULL rows; once the stand-in recovers, re-resolve brings them back, and the limit is never hit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    non_global_ips,
    publish,
    wait_for_topology,
)
from bangui_geo.testing.ipapi_standin import IpApiStandIn, Outage, ThreadedStandIn, expected_geo
from bangui_geo.testing.ips import known_public_ips

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in() -> Iterator[ThreadedStandIn]:
    with ThreadedStandIn(IpApiStandIn(requests_per_window=15, window=1.0)) as api:
        yield api


def ip_seen_bodies(ips: list[str]) -> list[dict[str, Any]]:
    """Singles and small lists, as fail2ban bans arrive."""
    bodies: list[dict[str, Any]] = [{"ip": ip, "jail": "sshd"} for ip in ips[: len(ips) // 2]]
    rest = ips[len(ips) // 2 :]
    bodies += [{"ips": rest[i : i + 7]} for i in range(0, len(rest), 7)]
    return bodies


def expected_row(ip: str) -> tuple[Any, ...]:
    geo = expected_geo(ip)
    assert geo is not None
    return (geo.country_code, geo.country_name, geo.asn, geo.org, "resolved", "ip-api")


async def test_outage_rows_come_back_through_re_resolve_without_breaking_the_limit(
    service_group: ServiceGroup, stand_in: ThreadedStandIn
) -> None:
    amqp_url = service_group.amqp_url
    service_group.env.update(
        GEO_PROVIDER="ip-api",
        GEO_IPAPI_URL=stand_in.url,
        GEO_IPAPI_REQUESTS_PER_WINDOW="15",
        GEO_IPAPI_WINDOW="1",
        GEO_IPAPI_TIMEOUT="2",
        GEO_RE_RESOLVE_INTERVAL="2",
    )
    public = known_public_ips(1_500, seed=31)
    private = non_global_ips(60, seed=37)
    during_outage, after_recovery = public[:500], public[500:]

    def rows() -> dict[str, tuple[Any, ...]]:
        return {ip: (*r[:4], *r[5:]) for ip, r in service_group.rows().items()}

    stand_in.set_outage(Outage.UNAVAILABLE)
    for name in ("persistence", "resolver", "timer"):
        service_group.start(name)
    await wait_for_topology(amqp_url)
    await publish(amqp_url, "ip.seen", ip_seen_bodies(during_outage + private))

    async def outage_rows_stored() -> bool:
        stored = rows()
        return all(ip in stored for ip in during_outage + private)

    await async_poll(outage_rows_stored, deadline_s=20, what="rows for the outage IPs")
    stored = rows()
    failed = [ip for ip in during_outage if stored[ip][4] == "failed"]
    assert len(failed) == len(during_outage)
    assert all(stored[ip][:4] == (None,) * 4 for ip in failed)  # NULL rows
    assert all(stored[ip][4] == "not_global" for ip in private)
    outage_requests = len(stand_in.records())
    assert outage_requests >= 1

    stand_in.set_outage(Outage.NONE)
    await publish(amqp_url, "ip.seen", ip_seen_bodies(after_recovery))
    expected = {ip: expected_row(ip) for ip in public}

    async def all_resolved() -> bool:
        stored = rows()
        return all(stored.get(ip) == row for ip, row in expected.items())

    await async_poll(all_resolved, deadline_s=30, what="every public IP resolved")
    assert all(rows()[ip][4] == "not_global" for ip in private)
    assert service_group.stop_all() == {"persistence": 0, "resolver": 0, "timer": 0}

    records = stand_in.records()
    statuses = [r.status for r in records]
    sent = [ip for r in records for ip in r.ips]
    average = len(sent) / len(records)
    print(  # request counts and batch fill; shown with pytest -s
        f"\npipeline: {len(records)} requests ({outage_requests} during the outage), "
        f"avg batch {average:.1f}, 429: {statuses.count(429)}, 422: {statuses.count(422)}"
    )
    assert statuses.count(429) == 0
    assert statuses.count(422) == 0
    assert average >= 50
    assert not set(sent) & set(private)
    assert set(sent) == set(public)
    resolver_events = [e.get("event") for e in service_group["resolver"].log_events()]
    assert "ipapi_request_failed" in resolver_events
    assert "ipapi_rate_limited" not in resolver_events
    assert any(
        e.get("event") == "geo_re_resolve_ran" and e.get("retried", 0) > 0
        for e in service_group["persistence"].log_events()
    )
