"""Several active writers on one PostgreSQL: two pipelines (one per broker vhost, as two hosts
would have) each with its own active persistence, writing overlapping rows in random order at
the same time, one of them SIGKILLed mid-stream and replaced by its standby. The table must end
exactly as the upsert rules say, whatever order the rows arrived in: nothing lost, nothing
wrong, no dead letter."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceProcess,
    async_poll,
    drain_queue,
    events,
    publish,
    ready_count,
    service_env,
    wait_for_topology,
)
from bangui_geo.testing.broker import BrokerAdmin
from bangui_geo.testing.postgres import read_rows
from shared.messages import iso_utc
from tests.integration.test_faults import distinct_public_ips

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, tzinfo=UTC)  # in the past: persistence refuses future rows
COUNTRIES = [("US", "United States"), ("DE", "Germany"), ("FR", "France"), ("JP", "Japan")]
IPS = 20_000
BATCH = 1000

Row = list[str | None]


def versions(ip: str, n: int) -> list[Row]:
    """Answers for ``ip`` obtained at distinct times. Where any resolved, every failure is older
    than them all, so the rules give one outcome whatever the order: the newest resolved row
    (or the newest failure when none resolved)."""
    out: list[Row] = []
    failures = 1 + n % 2
    for minute in range(failures):
        out.append([ip, "failed", iso_utc(T0 + timedelta(minutes=minute)), *[None] * 4, "ip-api"])
    if n % 5 == 0:
        return out
    for k in range(n):
        code, name = COUNTRIES[(n + k) % len(COUNTRIES)]
        cached_at = iso_utc(T0 + timedelta(minutes=10 + k, microseconds=n))
        out.append([ip, "resolved", cached_at, code, name, f"AS{n + k}", f"org {k}", "mmdb"])
    return out


def expected(rows: list[Row]) -> dict[str, tuple[Any, ...]]:
    """ip -> (country_code, country_name, asn, org, cached_at, resolution, provider)."""
    best: dict[str, Row] = {}
    for row in rows:
        old = best.get(str(row[0]))
        key = (row[3] is not None, str(row[2]))
        if old is None or key > (old[3] is not None, str(old[2])):
            best[str(row[0])] = row
    return {ip: (r[3], r[4], r[5], r[6], r[2], r[1], r[7]) for ip, r in best.items()}


def batches(rows: list[Row]) -> list[dict[str, Any]]:
    return [{"batch_id": f"b{i}", "rows": rows[i : i + BATCH]} for i in range(0, len(rows), BATCH)]


class Site:
    """One host's pipeline: a vhost of its own and its persistence instances, one database."""

    def __init__(self, name: str, amqp_url: str, pg_url: str, tmp_path: Path) -> None:
        self.name = name
        self.amqp_url = amqp_url
        self.pg_url = pg_url
        self.tmp_path = tmp_path
        self.writers: list[ServiceProcess] = []

    def start_writer(self) -> ServiceProcess:
        env = service_env(self.amqp_url, self.tmp_path / "unused.sqlite3", GEO_DB_URL=self.pg_url)
        log = self.tmp_path / f"{self.name}-persistence-{len(self.writers)}.log"
        process = ServiceProcess("persistence", env, log).start()
        self.writers.append(process)
        return process

    def applied(self) -> int:
        return sum(len(events(w, "geo_upserts_applied")) for w in self.writers)


@pytest.fixture
def second_vhost(broker_admin: BrokerAdmin) -> Iterator[str]:
    vhost = broker_admin.new_vhost()
    try:
        yield broker_admin.url_for(vhost)
    finally:
        broker_admin.delete_vhost(vhost)


async def test_two_active_writers_and_a_sigkill_lose_nothing_and_write_nothing_wrong(
    amqp_url: str, second_vhost: str, pg_url: str, tmp_path: Path
) -> None:
    shuffle = random.Random(17).shuffle
    ips = distinct_public_ips(IPS)
    every: list[Row] = [row for i, ip in enumerate(ips) for row in versions(ip, i % 7)]
    shuffle(every)
    half = len(every) // 2  # each IP's answers spread over both sites, in random order
    site_a = Site("a", amqp_url, pg_url, tmp_path)
    site_b = Site("b", second_vhost, pg_url, tmp_path)
    active_a = site_a.start_writer()
    site_b.start_writer()
    await wait_for_topology(site_a.amqp_url)
    await wait_for_topology(site_b.amqp_url)
    standby_a = site_a.start_writer()  # waits: the queue keeps its single active consumer
    for writer in site_a.writers + site_b.writers:
        await async_poll(
            lambda w=writer: events(w, "persistence_ready"), deadline_s=15, what="writer ready"
        )

    bodies_a, bodies_b = batches(every[:half]), batches(every[half:])
    publishing = asyncio.gather(
        publish(site_a.amqp_url, "geo.upsert", [json.dumps(b) for b in bodies_a]),
        publish(site_b.amqp_url, "geo.upsert", [json.dumps(b) for b in bodies_b]),
    )
    await async_poll(
        lambda: site_a.applied() >= 5 and site_b.applied() >= 1,
        deadline_s=30,
        what="both sites writing",
    )
    active_a.kill()  # mid-stream, with deliveries in flight
    assert len(events(active_a, "geo_upserts_applied")) < len(bodies_a), "killed too late"
    assert not events(standby_a, "geo_upserts_applied"), "the standby wrote beside the writer"
    await publishing

    async def drained() -> bool:
        queued = [await ready_count(s.amqp_url, "geo.persistence.upsert") for s in (site_a, site_b)]
        return queued == [0, 0] and site_b.applied() >= len(bodies_b)

    await async_poll(drained, deadline_s=60, interval=0.5, what="both upsert queues drained")
    want = expected(every)
    await async_poll(
        lambda: read_rows(pg_url) == want, deadline_s=20, what="the table the rules give"
    )
    assert len(want) == IPS
    assert events(standby_a, "geo_upserts_applied"), "the standby took over the writes"
    for site in (site_a, site_b):
        assert await drain_queue(site.amqp_url, "geo.dead_letter") == []
    survivors = [standby_a, *site_b.writers]
    assert not any(events(w, "message_failed_twice") for w in survivors)
    assert all(w.stop() == 0 for w in survivors)
