"""The pipeline on quorum queues (``GEO_QUEUE_TYPE=quorum``), in a fresh vhost of the one local
broker: rows arrive, malformed messages are dead-lettered with their reason, timer commands
expire by their per-message TTL instead of piling up, and the standby persistence takes over.
The queues a connection owns (each resolver's flush queue, the timer's lock) stay classic:
quorum queues cannot be exclusive."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bangui_geo.testing import (
    DURABLE_QUEUES,
    ServiceGroup,
    async_poll,
    drain_queue,
    events,
    public_ips,
    publish,
    queue_details,
    ready_count,
    vhost_queues,
    wait_for_topology,
)
from bangui_geo.testing.broker import BrokerAdmin
from bangui_geo.testing.expected import expected_row
from bangui_geo.testing.services import logged

pytestmark = pytest.mark.integration


def on_quorum_queues(group: ServiceGroup) -> ServiceGroup:
    """``group`` with ``GEO_QUEUE_TYPE=quorum`` for every service it starts."""
    group.env["GEO_QUEUE_TYPE"] = "quorum"
    return group


async def test_pipeline_on_quorum_queues(
    service_group: ServiceGroup, broker_admin: BrokerAdmin
) -> None:
    quorum = on_quorum_queues(service_group)
    url = quorum.amqp_url
    writer = quorum.start("persistence", "persistence-1")
    await wait_for_topology(url)
    await logged(writer, "persistence_ready", "first persistence ready")
    standby = quorum.start("persistence", "persistence-2")
    resolver = quorum.start("resolver", "resolver")
    timer = quorum.start("timer", "timer")
    await logged(standby, "persistence_ready", "second persistence ready")
    await logged(resolver, "resolver_ready", "resolver ready")
    await logged(timer, "timer_leading", "timer holds its lock queue")

    by_name = {q["name"]: q for q in await vhost_queues(broker_admin, url)}
    for name in DURABLE_QUEUES:
        assert by_name[name]["type"] == "quorum", name
        assert by_name[name]["durable"] is True
        assert by_name[name]["arguments"]["x-queue-type"] == "quorum"
    private = [q for name, q in by_name.items() if name.startswith("geo.resolver.flush.")]
    private.append(by_name["geo.timer.leader"])
    assert len(private) == 2
    assert all(q["type"] == "classic" and q["exclusive"] for q in private)

    ips = [*public_ips(6_000, seed=5), "10.9.8.7", "::1", "2001:4860:4860::8888"]
    expected = {ip: expected_row(ip) for ip in ips}
    bodies: list[Any] = [{"ip": ip} for ip in ips[:2_000]]
    bodies += [{"ips": ips[i : i + 1000]} for i in range(2_000, len(ips), 1000)]
    malformed = [b"not json", b'{"ip": "300.1.2.3"}', b'{"ips": []}', b'{"ips": [7, "x"]}']
    for i, bad in enumerate(malformed):
        bodies.insert(400 * (i + 1), bad)
    publisher = asyncio.create_task(publish(url, "ip.seen", bodies))

    # The single active consumer of a quorum queue dies mid-stream: the waiting one takes over.
    await async_poll(lambda: len(quorum.rows()) >= 1_000, deadline_s=20, what="1,000 rows")
    assert events(writer, "geo_upserts_applied")
    assert not events(standby, "geo_upserts_applied")
    assert len(quorum.rows()) < len(ips), "the stream ended before the writer could be killed"
    writer.kill()
    killed_at = time.monotonic()
    await logged(standby, "geo_upserts_applied", "the standby to take over the writes")
    assert time.monotonic() - killed_at < 5.0
    await publisher

    def summary() -> dict[str, tuple[Any, ...]]:
        return {ip: (r[0], r[1], r[5]) for ip, r in quorum.rows().items()}

    await async_poll(
        lambda: summary() == expected, deadline_s=30, interval=0.5, what="exactly the rows"
    )

    dead = await drain_queue(url, "geo.dead_letter")
    assert sorted(m.body for m in dead) == sorted(malformed)
    for message in dead:
        headers = message.headers or {}
        assert headers["x-geo-rejected-by"] == "resolver"
        assert headers["x-geo-original-queue"] == "geo.resolver.ip_seen"
        assert headers["x-geo-reject-reason"]
    reasons = {m.body: str((m.headers or {})["x-geo-reject-reason"]) for m in dead}
    assert "not valid JSON" in reasons[b"not json"]
    assert "300.1.2.3" in reasons[b'{"ip": "300.1.2.3"}']

    upsert = await queue_details(broker_admin, url, "geo.persistence.upsert")
    assert upsert["type"] == "quorum"
    assert upsert["arguments"]["x-single-active-consumer"] is True
    for name, process in quorum.processes.items():
        if name != "persistence-1":
            assert process.stop() == 0, name


async def test_timer_commands_expire_on_a_quorum_queue(service_group: ServiceGroup) -> None:
    quorum = on_quorum_queues(service_group)
    # Nobody consumes geo.persistence.re_resolve: each command lives one interval, then goes,
    # without a dead-letter exchange to pile into.
    timer = quorum.start(
        "timer", "timer", GEO_RE_RESOLVE_INTERVAL="0.3", GEO_LOG_LEVEL="debug"
    )  # each tick at debug
    await wait_for_topology(quorum.amqp_url)

    def re_resolves() -> int:
        return sum(1 for e in events(timer, "timer_tick_published") if e["cadence"] == "re_resolve")

    await async_poll(lambda: re_resolves() >= 10, deadline_s=15, what="ten re_resolve commands")
    waiting = await ready_count(quorum.amqp_url, "geo.persistence.re_resolve")
    assert waiting <= 2, f"{waiting} stale re_resolve commands kept of {re_resolves()} published"
    assert timer.stop() == 0
    assert await ready_count(quorum.amqp_url, "geo.dead_letter") == 0
