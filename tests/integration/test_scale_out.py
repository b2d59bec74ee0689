"""Scale out on one broker: two resolvers, two timers and two persistence instances on one
database (SQLite, then PostgreSQL). The resolvers compete for ``ip.seen``, every resolver gets
every ``geo.flush``, one timer publishes, one persistence writes while the other waits, and
SIGKILLing the writer mid-stream hands its queues to the standby with nothing lost."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    drain_queue,
    events,
    local_tcp_ports,
    public_ips,
    publish,
    queue_details,
    vhost_queues,
    wait_for_topology,
)
from bangui_geo.testing.amqp import FlushTap
from bangui_geo.testing.broker import BrokerAdmin
from bangui_geo.testing.expected import expected_row
from bangui_geo.testing.services import logged

pytestmark = pytest.mark.integration

FLUSH = 0.5
TOTAL = 20_000


def mixed_bodies(ips: list[str]) -> list[dict[str, Any]]:
    """5,000 single-IP messages with bulk ones (1,000 IPs) interleaved, and some repeats."""
    singles: list[dict[str, Any]] = [{"ip": ip, "source": "test"} for ip in ips[:5_000]]
    bulk: list[dict[str, Any]] = [{"ips": ips[i : i + 1000]} for i in range(5_000, len(ips), 1000)]
    bodies: list[dict[str, Any]] = []
    for i, body in enumerate(singles):
        bodies.append(body)
        if i % 350 == 0 and bulk:
            bodies.append(bulk.pop())
    bodies += bulk
    bodies += [{"ips": ips[:300:3]}, {"ip": ips[-1]}]  # already seen: cache hits or other replica
    return bodies


async def test_two_of_each_service_share_the_work_and_the_standby_writer_takes_over(
    any_store: ServiceGroup, flush_tap: FlushTap, broker_admin: BrokerAdmin
) -> None:
    any_store.env["GEO_FLUSH_INTERVAL"] = str(FLUSH)
    url = any_store.amqp_url
    started = time.monotonic()
    persistences = [any_store.start("persistence", f"persistence-{i}") for i in (1, 2)]
    await wait_for_topology(url)
    resolvers = [any_store.start("resolver", f"resolver-{i}") for i in (1, 2)]
    timers = [any_store.start("timer", f"timer-{i}") for i in (1, 2)]
    for persistence in persistences:
        await logged(persistence, "persistence_ready", "both persistence instances ready")
    for resolver in resolvers:
        await logged(resolver, "resolver_ready", "both resolvers ready")

    async def one_leader() -> bool:
        leading = [t for t in timers if events(t, "timer_leading")]
        waiting = [t for t in timers if events(t, "timer_standby_waiting")]
        return len(leading) == 1 and len(waiting) == 1 and leading != waiting

    await async_poll(one_leader, deadline_s=15, what="one timer leading, one standing by")

    # What the broker sees (its statistics come every few seconds): competing consumers, a
    # fan-out of flushes, an active and a waiting writer.
    async def view(name: str, consumers: int) -> dict[str, Any]:
        async def counted() -> dict[str, Any] | None:
            details = await queue_details(broker_admin, url, name)
            return details if details.get("consumers") == consumers else None

        found: dict[str, Any] = await async_poll(
            counted, deadline_s=15, interval=0.5, what=f"{consumers} consumers on {name}"
        )
        return found

    await view("geo.resolver.ip_seen", 2)
    await view("geo.resolver.retry", 2)
    queues = await vhost_queues(broker_admin, url)
    flush_queues = [q for q in queues if q["name"].startswith("geo.resolver.flush.")]
    assert len(flush_queues) == 2
    for queue in flush_queues:
        assert queue["exclusive"] is True
        await view(queue["name"], 1)
    active: dict[str, int] = {}
    for name in ("geo.persistence.upsert", "geo.persistence.re_resolve"):
        sac = await view(name, 2)
        assert sac["arguments"]["x-single-active-consumer"] is True
        statuses = sorted(c["activity_status"] for c in sac["consumer_details"])
        assert statuses == ["single_active", "waiting"], (name, statuses)
        (consumer,) = [c for c in sac["consumer_details"] if c["active"]]
        assert consumer["consumer_tag"] == sac["single_active_consumer_tag"]
        active[name] = consumer["channel_details"]["peer_port"]
    # The writer is the process behind the active consumer of geo.persistence.upsert. (The one
    # consuming geo.persistence.re_resolve may be the other: that handler only reads.)
    (writer,) = [
        p
        for p in persistences
        if p.process and active["geo.persistence.upsert"] in local_tcp_ports(p.process.pid)
    ]
    (standby,) = [p for p in persistences if p is not writer]

    ips = public_ips(TOTAL - 20, seed=4)
    ips += [f"10.77.0.{i}" for i in range(1, 11)] + [f"fd00::{i:x}" for i in range(1, 11)]
    expected = {ip: expected_row(ip) for ip in ips}
    publisher = asyncio.create_task(publish(url, "ip.seen", mixed_bodies(ips)))

    # Mid-stream: the broker's active consumer is the one that has applied upserts.
    await async_poll(lambda: len(any_store.rows()) >= 4_000, deadline_s=30, what="4,000 rows")
    assert events(writer, "geo_upserts_applied")
    assert not events(standby, "geo_upserts_applied"), "the standby wrote while the writer lived"
    rows_at_kill = len(any_store.rows())
    assert rows_at_kill < len(ips), "the stream ended before the writer could be killed"
    writer.kill()
    killed_at = time.monotonic()
    await logged(standby, "geo_upserts_applied", "the standby to take over the writes")
    handover_s = time.monotonic() - killed_at
    assert handover_s < 5.0, f"standby took {handover_s:.1f}s to write"
    await publisher

    def summary() -> dict[str, tuple[Any, ...]]:
        return {ip: (r[0], r[1], r[5]) for ip, r in any_store.rows().items()}

    await async_poll(
        lambda: summary() == expected,
        deadline_s=30,
        interval=0.5,
        what=f"exactly the {len(expected)} expected rows",
    )
    assert len(any_store.rows()) == len(ips)
    assert await drain_queue(url, "geo.dead_letter") == []

    # Competing consumers: both resolvers resolved and flushed part of the stream.
    flushed = [sum(e["rows"] for e in events(r, "geo_cache_flush_ran")) for r in resolvers]
    assert all(n > 0 for n in flushed), flushed
    # Each replica got the same flush commands: ticks that made both of them flush.
    triggers = [
        {t for e in events(r, "geo_cache_flush_ran") if (t := e["trigger"]).startswith("flush:")}
        for r in resolvers
    ]
    assert triggers[0] & triggers[1], "no geo.flush reached both resolvers"

    # One command stream: each tick id once, consecutive ids exactly one interval apart, and
    # about one command per interval of wall time.
    arrived = [tick for _, tick in flush_tap.ticks]
    assert len(arrived) == len(set(arrived)), "a flush command arrived twice"
    epochs = [float(tick.split(":", 1)[1]) for tick in arrived]
    assert {round(b - a, 3) for a, b in itertools.pairwise(epochs)} == {FLUSH}
    window = flush_tap.ticks[-1][0] - flush_tap.ticks[0][0]
    assert len(arrived) - 1 <= window / FLUSH + 1
    assert triggers[0] | triggers[1] <= set(arrived)

    survivors = [p for p in any_store.processes.values() if p is not writer]
    assert all(p.running for p in survivors)
    for process in survivors:
        assert process.stop() == 0, process.log_path.name
    assert time.monotonic() - started < 40
