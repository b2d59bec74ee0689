"""/metrics and /health on each service (GEO_METRICS_PORT), read over real HTTP."""

from __future__ import annotations

import json

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    publish,
    read_rows,
    wait_for_topology,
)
from bangui_geo.testing.http import free_port, get, metric

pytestmark = pytest.mark.integration


async def test_metrics_and_health_on_every_service(service_group: ServiceGroup) -> None:
    amqp_url, db_path = service_group.amqp_url, service_group.db_path
    ports = {name: free_port() for name in ("resolver", "timer", "persistence")}
    processes = [
        service_group.start(name, GEO_METRICS_PORT=str(port)) for name, port in ports.items()
    ]
    try:
        await wait_for_topology(amqp_url)
        await publish(amqp_url, "ip.seen", [{"ips": ["8.8.8.8", "1.1.1.1", "10.0.0.1"]}, b"junk"])
        await async_poll(lambda: len(read_rows(db_path)) == 3, deadline_s=20, what="3 rows")

        def scraped(name: str) -> str:
            status, text = get(ports[name], "/metrics")
            assert status == 200
            return text

        await async_poll(
            lambda: metric(scraped("persistence"), "geo_rows_upserted_total") >= 3,
            deadline_s=10,
            what="persistence metrics",
        )
        resolver = scraped("resolver")
        assert metric(resolver, "geo_messages_consumed_total", queue="geo.resolver.ip_seen") == 2
        assert metric(resolver, "geo_dead_letters_total", queue="geo.resolver.ip_seen") == 1
        assert metric(resolver, "geo_cache_misses_total") == 3
        assert metric(resolver, "geo_cache_entries") == 3
        assert metric(resolver, "geo_lookups_total") == 2  # the private IP is never looked up
        assert "# TYPE geo_cache_hits_total counter" in resolver
        persistence = scraped("persistence")
        assert metric(persistence, "geo_sqlite_commits_total") >= 1
        timer = scraped("timer")
        assert metric(timer, "geo_timer_leading") == 1
        assert metric(timer, "geo_timer_ticks_total", cadence="flush") >= 1
        for name, port in ports.items():
            status, body = get(port, "/health")
            assert status == 200
            assert json.loads(body) == {"service": name, "status": "ok"}
    finally:
        for process in processes:
            assert process.stop() == 0
