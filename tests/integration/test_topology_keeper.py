"""A deleted exchange, queue or binding, on the real broker: a service with a user that may
configure the topology restores it; one with the deployment's own user restores the bindings of
its own queues, and stops with one line for what only the definitions may create."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError

from bangui_geo.testing import (
    ServiceGroup,
    ServiceProcess,
    async_poll,
    events,
    publish,
    read_rows,
    vhost_of,
)
from bangui_geo.testing.broker import BrokerAdmin
from tests.integration.deployment import Deployment, management

pytestmark = pytest.mark.integration

PERSISTENCE = "geo-persistence"
RESOLVER = "geo-resolver"
BATCH = (
    b'{"batch_id": "b", "rows": [["8.8.8.8", "resolved", "2026-11-22T12:01:26.519722Z", "US",'
    b' "United States", null, null, "embedded"]]}'
)


def delete(admin: BrokerAdmin, vhost: str, kind: str, name: str) -> None:
    management(admin, "DELETE", f"/api/{kind}/{quote(vhost, safe='')}/{quote(name, safe='')}")


def unbind(admin: BrokerAdmin, vhost: str, exchange: str, queue: str, key: str) -> None:
    v, e, q = (quote(x, safe="") for x in (vhost, exchange, queue))
    management(admin, "DELETE", f"/api/bindings/{v}/e/{e}/q/{q}/{quote(key, safe='')}")


async def routed(url: str, key: str, body: bytes) -> bool:
    """A mandatory publish was confirmed: some queue is bound to ``key`` on bangui."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange("bangui", ensure=True)
        await exchange.publish(aio_pika.Message(body), key, mandatory=True)
    except (PublishError, DeliveryError, AMQPError):
        return False
    finally:
        await connection.close()
    return True


def wait_exit(process: ServiceProcess, timeout: float) -> int:
    assert process.process is not None
    return process.process.wait(timeout=timeout)


async def test_a_deleted_exchange_and_its_bindings_are_restored(
    amqp_url: str, broker_admin: BrokerAdmin, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    processes = {name: service_group.start(name) for name in ("persistence", "resolver", "timer")}
    try:
        await async_poll(
            lambda: events(processes["resolver"], "resolver_ready"), deadline_s=20, what="ready"
        )
        await publish(amqp_url, "ip.seen", [{"ip": "8.8.8.8"}])
        await async_poll(lambda: "8.8.8.8" in read_rows(db_path), deadline_s=20, what="first row")

        delete(broker_admin, vhost_of(amqp_url), "exchanges", "bangui")
        deleted_at = time.time()
        # Every binding went with it, the resolver's own flush queue's too.
        await async_poll(
            lambda: routed(amqp_url, "ip.seen", b'{"ip": "9.9.9.9"}'),
            deadline_s=30,
            what="bangui back with ip.seen bound",
        )

        def flushed_by_the_timer() -> bool:
            return any(
                str(e.get("trigger", "")).startswith("flush:")
                and e.get("rows", 0) > 0
                and _epoch(e) > deleted_at
                for e in events(processes["resolver"], "geo_cache_flush_ran")
            )

        await async_poll(
            flushed_by_the_timer,
            deadline_s=30,
            what="a geo.flush from the timer reaching the resolver",
        )
        await async_poll(lambda: "9.9.9.9" in read_rows(db_path), deadline_s=20, what="new row")
        created = [
            e
            for p in processes.values()
            for e in events(p, "amqp_topology_created")
            if _epoch(e) > deleted_at
        ]
        assert {(e["kind"], e["name"]) for e in created} == {("exchange", "bangui")}
        assert all(p.running for p in processes.values())
    finally:
        codes = {name: p.stop() for name, p in processes.items()}
    assert codes == dict.fromkeys(processes, 0)


def _epoch(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def test_a_deleted_binding_of_its_own_queue_is_restored_with_the_deployments_user(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    persistence = service_group.start("persistence", amqp_url=deployment.url(PERSISTENCE))
    try:
        await async_poll(
            lambda: events(persistence, "persistence_ready"), deadline_s=20, what="ready"
        )
        unbind(deployment.admin, deployment.vhost, "bangui", "geo.persistence.upsert", "geo.upsert")
        assert not await routed(deployment.url(RESOLVER), "geo.upsert", BATCH)
        await async_poll(
            lambda: routed(deployment.url(RESOLVER), "geo.upsert", BATCH),
            deadline_s=30,
            what="geo.persistence.upsert bound again",
        )
        await async_poll(lambda: "8.8.8.8" in read_rows(db_path), deadline_s=20, what="the row")
        assert persistence.running
    finally:
        code = persistence.stop()
    assert code == 0


async def test_a_deleted_exchange_stops_a_service_that_may_not_create_it(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    persistence = service_group.start("persistence", amqp_url=deployment.url(PERSISTENCE))
    try:
        await async_poll(
            lambda: events(persistence, "persistence_ready"), deadline_s=20, what="ready"
        )
        delete(deployment.admin, deployment.vhost, "exchanges", "bangui")
        code = await asyncio.to_thread(wait_exit, persistence, 30)
    finally:
        if persistence.running:
            persistence.stop()
    assert code == 1
    (failed,) = events(persistence, "service_failed")
    user = deployment.users[PERSISTENCE]
    assert failed["reason"].startswith(
        f"exchange 'bangui' does not exist and user {user!r} may not create it: "
        "the broker definitions create it"
    )
    assert failed["level"] == "error"
    assert not events(persistence, "service_crashed")


async def test_a_missing_queue_stops_the_start_with_one_line(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    delete(deployment.admin, deployment.vhost, "queues", "geo.persistence.upsert")
    persistence = service_group.start("persistence", amqp_url=deployment.url(PERSISTENCE))
    code = await asyncio.to_thread(wait_exit, persistence, 30)
    assert code == 1
    (failed,) = events(persistence, "service_start_failed")
    assert failed["reason"] == (
        f"queue 'geo.persistence.upsert' does not exist and user "
        f"{deployment.users[PERSISTENCE]!r} may not create it: the broker definitions create it "
        "(deploy/rabbitmq/definitions.json, loaded at boot), or an administrator must"
    )
    assert not events(persistence, "service_crashed")
