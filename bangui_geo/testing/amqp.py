"""The broker side of a test of the geo services: publish raw bodies with confirms, take what a
queue holds, wait for the topology, and read the management API's view of a vhost's queues."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aio_pika.abc

from bangui_geo.testing.broker import BrokerAdmin, management_json
from bangui_geo.testing.polling import async_poll

# The contract's durable queues, spelled out (not taken from shared.topology) so that a renamed
# queue fails the tests that check how the broker holds them.
DURABLE_QUEUES = (
    "geo.resolver.ip_seen",
    "geo.resolver.retry",
    "geo.persistence.upsert",
    "geo.persistence.re_resolve",
    "geo.dead_letter",
)


async def publish(
    amqp_url: str,
    routing_key: str,
    bodies: Iterable[bytes | Mapping[str, Any] | list[Any] | str],
    *,
    exchange: str = "bangui",
) -> int:
    """Publish raw bodies (dicts are JSON-encoded) with confirms; returns how many."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        encoded = [
            b
            if isinstance(b, bytes)
            else (b.encode() if isinstance(b, str) else json.dumps(b).encode())
            for b in bodies
        ]
        for start in range(0, len(encoded), 500):
            await asyncio.gather(
                *(
                    target.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key,
                    )
                    for body in encoded[start : start + 500]
                )
            )
        return len(encoded)
    finally:
        await connection.close()


async def drain_queue(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message currently in ``queue_name`` (acked)."""
    connection = await aio_pika.connect(amqp_url)
    out = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            out.append(message)
    finally:
        await connection.close()
    return out


async def wait_for_topology(amqp_url: str, deadline_s: float = 20.0) -> None:
    """Wait until a service has declared the topology: both exchanges and every durable queue.

    A service declares the queues one by one, each bound at once, ``geo.dead_letter`` last; a
    test that saw only the first could publish into an exchange whose queue did not exist yet,
    and the broker drops what no queue is bound for."""

    async def declared() -> bool:
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            for exchange in ("bangui", "bangui.dlx"):
                await channel.get_exchange(exchange, ensure=True)
            for name in DURABLE_QUEUES:
                await channel.get_queue(name, ensure=True)
            return True
        except Exception:
            return False
        finally:
            await connection.close()

    await async_poll(declared, deadline_s=deadline_s, what="topology declared")


async def ready_count(amqp_url: str, queue_name: str) -> int:
    """Messages ready in ``queue_name`` (delivered-but-unacked ones are not counted)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (its path, percent-decoded; ``/`` when there is none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def queue_details(admin: BrokerAdmin, amqp_url: str, queue: str) -> dict[str, Any]:
    """The management API's view of one queue of ``amqp_url``'s vhost: ``consumers``,
    ``consumer_details``, ``single_active_consumer_tag``, ``type``, ``arguments``, …"""
    path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}/{quote(queue, safe='')}"
    details = await asyncio.to_thread(management_json, admin, path)
    assert isinstance(details, dict), details
    return details


async def vhost_queues(admin: BrokerAdmin, amqp_url: str) -> list[dict[str, Any]]:
    """Every queue of ``amqp_url``'s vhost, as the management API lists them."""
    path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}"
    queues = await asyncio.to_thread(management_json, admin, path)
    assert isinstance(queues, list), queues
    return queues


class FlushTap:
    """What a private queue bound to ``geo.flush`` receives: every command the timers send, with
    its arrival on the monotonic clock (consume with ``on_message``)."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, str]] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.ticks.append((time.monotonic(), json.loads(message.body)["tick_id"]))
        await message.ack()
