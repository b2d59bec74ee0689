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
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    ServiceProcess,
    async_poll,
    drain_queue,
    events,
    public_ips,
    publish,
    ready_count,
    wait_for_topology,
)
from bangui_geo.testing.broker import BrokerAdmin
from bangui_geo.testing.postgres import read_rows
from shared.messages import iso_utc

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


def applied(writers: list[ServiceProcess]) -> int:
    return sum(len(events(w, "geo_upserts_applied")) for w in writers)


@pytest.fixture
def second_vhost(broker_admin: BrokerAdmin) -> Iterator[str]:
    vhost = broker_admin.new_vhost()
    try:
        yield broker_admin.url_for(vhost)
    finally:
        broker_admin.delete_vhost(vhost)


async def test_two_active_writers_and_a_sigkill_lose_nothing_and_write_nothing_wrong(
    service_group: ServiceGroup, second_vhost: str, pg_url: str
) -> None:
    # Two hosts' pipelines, each on a vhost of its own with its persistence instances, and one
    # database.
    amqp_url = service_group.amqp_url
    service_group.env["GEO_DB_URL"] = pg_url
    shuffle = random.Random(17).shuffle
    ips = public_ips(IPS, seed=6)
    every: list[Row] = [row for i, ip in enumerate(ips) for row in versions(ip, i % 7)]
    shuffle(every)
    half = len(every) // 2  # each IP's answers spread over both sites, in random order
    active_a = service_group.start("persistence", "a-persistence-0")
    writers_b = [service_group.start("persistence", "b-persistence-0", amqp_url=second_vhost)]
    await wait_for_topology(amqp_url)
    await wait_for_topology(second_vhost)
    # waits: the queue keeps its single active consumer
    standby_a = service_group.start("persistence", "a-persistence-1")
    writers_a = [active_a, standby_a]
    for writer in writers_a + writers_b:
        await async_poll(
            lambda w=writer: events(w, "persistence_ready"), deadline_s=15, what="writer ready"
        )

    bodies_a, bodies_b = batches(every[:half]), batches(every[half:])
    publishing = asyncio.gather(
        publish(amqp_url, "geo.upsert", [json.dumps(b) for b in bodies_a]),
        publish(second_vhost, "geo.upsert", [json.dumps(b) for b in bodies_b]),
    )
    await async_poll(
        lambda: applied(writers_a) >= 5 and applied(writers_b) >= 1,
        deadline_s=30,
        what="both sites writing",
    )
    active_a.kill()  # mid-stream, with deliveries in flight
    assert len(events(active_a, "geo_upserts_applied")) < len(bodies_a), "killed too late"
    assert not events(standby_a, "geo_upserts_applied"), "the standby wrote beside the writer"
    await publishing

    async def drained() -> bool:
        queued = [await ready_count(u, "geo.persistence.upsert") for u in (amqp_url, second_vhost)]
        return queued == [0, 0] and applied(writers_b) >= len(bodies_b)

    await async_poll(drained, deadline_s=60, interval=0.5, what="both upsert queues drained")
    want = expected(every)
    await async_poll(
        lambda: read_rows(pg_url) == want, deadline_s=20, what="the table the rules give"
    )
    assert len(want) == IPS
    assert events(standby_a, "geo_upserts_applied"), "the standby took over the writes"
    for url in (amqp_url, second_vhost):
        assert await drain_queue(url, "geo.dead_letter") == []
    survivors = [standby_a, *writers_b]
    assert not any(events(w, "message_failed_twice") for w in survivors)
    assert all(w.stop() == 0 for w in survivors)
