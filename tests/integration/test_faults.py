"""Fault suite: nothing the broker accepted is lost through SIGKILLed services, a broker restart,
or a locked database; and nothing is written twice."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading

import aio_pika
import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    drain_queue,
    public_ips,
    publish,
    wait_for_topology,
)
from bangui_geo.testing.broker import BrokerAdmin

pytestmark = pytest.mark.integration


async def publish_resilient(amqp_url: str, bodies: list[dict[str, object]]) -> None:
    """A publisher as other components should write one: confirms, and retry on failure."""
    connection = await aio_pika.connect_robust(amqp_url, reconnect_interval=0.5)
    try:
        for start in range(0, len(bodies), 250):
            chunk = bodies[start : start + 250]
            for _attempt in range(120):
                try:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange("bangui")
                    await asyncio.gather(
                        *(
                            exchange.publish(
                                aio_pika.Message(
                                    _json(b), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                                ),
                                "ip.seen",
                                timeout=5,
                            )
                            for b in chunk
                        )
                    )
                    await channel.close()
                    break
                except Exception:
                    await asyncio.sleep(0.5)
            else:
                raise AssertionError("could not publish through the broker restart")
    finally:
        await connection.close()


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body).encode()


def rabbitmqctl(admin: BrokerAdmin, *args: str) -> None:
    """rabbitmqctl on the test broker: on this machine, or in its container."""
    ctl = admin.ctl()
    assert ctl, "the broker-restart fault needs rabbitmqctl on the broker's machine"
    subprocess.run([*ctl, *args], check=True, capture_output=True, timeout=120)


async def test_sigkill_every_service_and_restart_the_broker_loses_nothing(
    service_group: ServiceGroup, broker_admin: BrokerAdmin
) -> None:
    ips = public_ips(35_000, seed=1)
    singles = [{"ip": ip} for ip in ips[:5_000]]
    bulk = [{"ips": ips[i : i + 1000]} for i in range(5_000, 35_000, 1000)]
    bodies: list[dict[str, object]] = []
    for i, body in enumerate(singles):  # interleave bulk messages among the singles
        bodies.append(body)
        if i % 170 == 0 and bulk:
            bodies.append(bulk.pop())
    bodies += bulk

    for name in ("persistence", "resolver", "timer"):
        service_group.start(name)
    await wait_for_topology(service_group.amqp_url)
    publisher = asyncio.create_task(publish_resilient(service_group.amqp_url, bodies))

    async def rows_at_least(n: int) -> bool:
        return service_group.row_count() >= n

    await async_poll(lambda: rows_at_least(3_000), deadline_s=60, what="3,000 rows")
    service_group.restart("resolver")
    await async_poll(lambda: rows_at_least(8_000), deadline_s=60, what="8,000 rows")
    service_group.restart("persistence")
    service_group.restart("timer")
    await async_poll(lambda: rows_at_least(14_000), deadline_s=60, what="14,000 rows")

    rabbitmqctl(broker_admin, "stop_app")
    try:
        await asyncio.sleep(1.0)
    finally:
        rabbitmqctl(broker_admin, "start_app")
    rabbitmqctl(broker_admin, "await_startup")
    await publisher
    service_group.restart("resolver")

    async def complete() -> bool:
        return service_group.row_count() >= len(ips)

    await async_poll(complete, deadline_s=120, what="all 35,000 IPs in geo_cache", interval=0.5)
    rows = service_group.rows()
    assert set(rows) == set(ips), (
        f"missing {len(set(ips) - set(rows))}, extra {len(set(rows) - set(ips))}"
    )
    assert len(rows) == len(ips)  # ip is the primary key: no duplicates
    assert all(p.running for p in service_group.processes.values()), "all services still run"

    # On a fast broker every row can land before the restarted resolver has even installed its
    # signal handlers; a SIGTERM then would end it with the default action (-15), not a drain.
    async def restarted_resolver_ready() -> bool:
        events = service_group.processes["resolver"].log_events()
        return any(event.get("event") == "resolver_ready" for event in events)

    await async_poll(restarted_resolver_ready, deadline_s=60, what="the restarted resolver ready")
    codes = {name: p.stop() for name, p in service_group.processes.items()}
    assert codes == dict.fromkeys(codes, 0), codes


async def test_locked_database_backs_off_and_requeues(service_group: ServiceGroup) -> None:
    service_group.start("persistence")
    service_group.start("resolver")
    service_group.start("timer")
    await wait_for_topology(service_group.amqp_url)
    await publish(service_group.amqp_url, "ip.seen", [{"ip": "8.8.8.8"}])
    await async_poll(lambda: "8.8.8.8" in service_group.rows(), deadline_s=15, what="row")

    # Another writer holds the database for longer than persistence's busy timeout (5 s).
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(service_group.db_path, timeout=5, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(20)
        db.execute("ROLLBACK")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        await publish(service_group.amqp_url, "ip.seen", [{"ips": ["1.1.1.1", "9.9.9.9"]}])
        persistence = service_group.processes["persistence"]
        await async_poll(
            lambda: any(e.get("event") == "message_requeued" for e in persistence.log_events()),
            deadline_s=20,
            what="persistence to requeue the batch it could not write",
        )
    finally:
        release.set()
        holder.join()
    await async_poll(
        lambda: {"1.1.1.1", "9.9.9.9"} <= set(service_group.rows()),
        deadline_s=20,
        what="rows written once the lock is gone",
    )
    assert await drain_queue(service_group.amqp_url, "geo.dead_letter") == []
    assert service_group.processes["persistence"].running
