"""Rows stay fresh: re-resolve also retries resolved rows older than GEO_MAX_AGE, at most
GEO_REFRESH_PER_TICK per tick, oldest first, and a refresh that fails keeps the old answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    publish,
    read_rows,
    wait_for_topology,
)
from bangui_geo.testing.ipapi_standin import IpApiStandIn, Outage, ThreadedStandIn, expected_geo
from bangui_geo.testing.ips import known_public_ips
from services.persistence.repository import SqliteGeoRepository
from shared.messages import GeoRow, Resolution, iso_utc

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in() -> Iterator[ThreadedStandIn]:
    with ThreadedStandIn(IpApiStandIn(requests_per_window=1000, window=1.0)) as api:
        yield api


def old_row(ip: str, age: timedelta) -> GeoRow:
    at = iso_utc(datetime.now(UTC) - age)
    return GeoRow(ip, Resolution.RESOLVED, at, "DE", "Germany", None, None, "old")


def tick(n: int) -> bytes:
    issued = iso_utc(datetime.now(UTC))
    return json.dumps({"tick_id": f"re_resolve:{n}", "issued_at": issued}).encode()


async def test_old_rows_are_refreshed_oldest_first_and_a_failed_refresh_keeps_them(
    service_group: ServiceGroup, stand_in: ThreadedStandIn
) -> None:
    amqp_url, db_path = service_group.amqp_url, service_group.db_path
    ips = known_public_ips(7, seed=61)
    ages = [timedelta(days=d) for d in (10, 9, 8, 7, 6, 5)] + [timedelta(hours=1)]
    repository = await SqliteGeoRepository.open(db_path)
    await repository.upsert_many([old_row(ip, age) for ip, age in zip(ips, ages, strict=True)])
    await repository.close()
    before = read_rows(db_path)
    service_group.env.update(
        GEO_PROVIDER="ip-api",
        GEO_IPAPI_URL=stand_in.url,
        GEO_IPAPI_REQUESTS_PER_WINDOW="1000",
        GEO_IPAPI_WINDOW="1",
        GEO_MAX_AGE="86400",
        GEO_REFRESH_PER_TICK="3",
    )
    service_group.start("persistence")
    resolver = service_group.start("resolver")
    await wait_for_topology(amqp_url)
    await publish(amqp_url, "geo.re_resolve", [tick(1)])  # no timer: one tick at a time

    async def oldest_refreshed() -> bool:
        rows = read_rows(db_path)
        return all(rows[ip][6] == "ip-api" for ip in ips[:3])

    await async_poll(oldest_refreshed, deadline_s=20, what="the 3 oldest rows refreshed")
    rows = read_rows(db_path)
    for ip in ips[:3]:
        geo = expected_geo(ip)
        assert geo is not None
        assert rows[ip][0] == geo.country_code
        assert rows[ip][4] > before[ip][4]
    assert {ip: rows[ip] for ip in ips[3:]} == {ip: before[ip] for ip in ips[3:]}

    stand_in.set_outage(Outage.UNAVAILABLE)
    failed_from = len(stand_in.records())
    await publish(amqp_url, "geo.re_resolve", [tick(2)])

    def refresh_ran() -> bool:
        return any(
            e.get("event") == "geo_refresh_ran" and e.get("tick_id") == "re_resolve:2"
            for e in resolver.log_events()
        )

    await async_poll(refresh_ran, deadline_s=20, what="the second refresh")
    asked = {ip for r in stand_in.records()[failed_from:] for ip in r.ips}
    assert asked == set(ips[3:6])  # the next oldest; the fresh row is never refreshed
    assert {ip: read_rows(db_path)[ip] for ip in ips[3:]} == {ip: before[ip] for ip in ips[3:]}
    assert service_group.stop_all() == {"resolver": 0, "persistence": 0}
    assert {ip: read_rows(db_path)[ip] for ip in ips[3:]} == {ip: before[ip] for ip in ips[3:]}
