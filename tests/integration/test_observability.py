"""/metrics and /health on each service (GEO_METRICS_PORT), read over real HTTP."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from bangui_geo.testing import (
    ServiceProcess,
    async_poll,
    publish,
    read_rows,
    service_env,
    wait_for_topology,
)

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics")


async def test_metrics_and_health_on_every_service(amqp_url: str, tmp_path: Path) -> None:
    db_path = tmp_path / "geo.sqlite3"
    ports = {name: free_port() for name in ("resolver", "timer", "persistence")}
    processes = [
        ServiceProcess(
            name,
            service_env(amqp_url, db_path, GEO_METRICS_PORT=str(port)),
            tmp_path / f"{name}.log",
        ).start()
        for name, port in ports.items()
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
