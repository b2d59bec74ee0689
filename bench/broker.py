"""The benchmark's broker side: fresh vhosts (all deleted at the end), pre-filled queues, and the
bare aio-pika consumer that is the baseline of the throughput figures.

The baseline shares the broker, the message bodies and the delivery mode with the project, and
does only what any consumer must (parse and ack), so the ratio isolates the pipeline's own cost.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bangui_geo.testing.broker import BrokerAdmin
from shared import topology
from shared.amqp import declare_topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
BARE_QUEUE = "bench.bare.ip_seen"
BATCHED_QUEUE = "bench.bare_batched.ip_seen"
BATCHED_ACK_EVERY = 100
BARE_PREFETCH = 1000
PUBLISH_GROUP = 1000


def admin_from_env() -> BrokerAdmin:
    """``GEO_BENCH_AMQP_URL`` (any vhost path is ignored) and ``GEO_BENCH_MANAGEMENT_URL``."""
    url = os.environ.get("GEO_BENCH_AMQP_URL") or DEFAULT_AMQP_URL
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return BrokerAdmin(
        amqp_url=urlunsplit((parts.scheme, parts.netloc, "/", "", "")),
        management_url=os.environ.get("GEO_BENCH_MANAGEMENT_URL") or f"http://{host}:15672",
        user=parts.username or "guest",
        password=parts.password or "guest",
    )


def masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def broker_version(admin: BrokerAdmin) -> str:
    """RabbitMQ and Erlang versions from the management API overview, or why not."""
    request = urllib.request.Request(admin.management_url + "/api/overview")
    token = base64.b64encode(f"{admin.user}:{admin.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            overview = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"unknown (management API not reachable: {exc})"
    return f"{overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})"


@dataclass
class VhostPool:
    """Every vhost this run created; ``delete_all`` runs in the run's ``finally``."""

    admin: BrokerAdmin
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    created: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"bangui-geo-bench-{self.run_id}-"

    def new(self, label: str) -> str:
        """Create a fresh vhost for one scenario; returns its AMQP URL."""
        name = self.prefix + label
        self.admin.create_vhost(name)
        self.created.append(name)
        return self.admin.url_for(name)

    def delete_all(self) -> list[str]:
        """Delete what was created; returns the names that could not be deleted."""
        failed = []
        for name in self.created:
            try:
                self.admin.delete_vhost(name)
            except Exception:  # best effort, reported by the caller
                failed.append(name)
        self.created.clear()
        return failed


async def connect(url: str) -> AbstractConnection:
    """A plain connection: a benchmark that loses its broker should stop, not reconnect (and a
    robust channel answers a passive declare from its cache, hiding the queue's real depth)."""
    return await aio_pika.connect(url, timeout=10)


def _persistent(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(
        body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


async def declare_bare_queue(channel: AbstractChannel, name: str) -> None:
    """A queue like ``geo.resolver.ip_seen`` (same arguments) that also gets every ``ip.seen``."""
    queue = await channel.declare_queue(
        name, durable=True, arguments=topology.RESOLVER_IP_SEEN.declare_arguments() or None
    )
    await queue.bind(topology.EXCHANGE, routing_key=topology.IP_SEEN)


async def prefill(url: str, bodies: Sequence[bytes], *, bare_queues: Sequence[str] = ()) -> float:
    """Declare the topology (and the bare queues), publish ``bodies`` as ``ip.seen`` with
    confirms, check every queue holds them all; returns the seconds publishing took."""
    connection = await connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel)
        for name in bare_queues:
            await declare_bare_queue(channel, name)
        exchange = await channel.get_exchange(topology.EXCHANGE)
        started = time.perf_counter()
        for start in range(0, len(bodies), PUBLISH_GROUP):
            await asyncio.gather(
                *(
                    exchange.publish(_persistent(body), topology.IP_SEEN, timeout=30)
                    for body in bodies[start : start + PUBLISH_GROUP]
                )
            )
        elapsed = time.perf_counter() - started
        for name in (topology.RESOLVER_IP_SEEN.name, *bare_queues):
            ready = await queue_ready(channel, name)
            if ready != len(bodies):
                raise RuntimeError(f"{name} holds {ready} messages after publishing {len(bodies)}")
        return elapsed
    finally:
        await connection.close()


async def queue_ready(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


@dataclass(frozen=True)
class BareResult:
    messages: int
    ips: int
    seconds: float


def _count_ips(data: Any) -> int:
    if isinstance(data, dict) and isinstance(data.get("ips"), list):
        return len(data["ips"])
    return 1


async def bare_drain(
    url: str,
    queue_name: str,
    expected: int,
    *,
    prefetch: int = BARE_PREFETCH,
    ack_every: int = 1,
    limit_s: float,
) -> BareResult:
    """Consume ``expected`` messages from a full queue: ``json.loads`` and ack, nothing else.

    ``ack_every=1`` acks each message (the plain aio-pika idiom); more acks every n-th message
    with ``multiple=True``. Timed from just before ``basic.consume`` (connection, channel and qos
    already set up) to the last ack; then the queue is deleted.
    """
    connection = await connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        counts = {"messages": 0, "ips": 0}

        async def on_message(message: AbstractIncomingMessage) -> None:
            counts["ips"] += _count_ips(json.loads(message.body))
            counts["messages"] += 1
            if ack_every == 1:
                await message.ack()
            elif counts["messages"] % ack_every == 0 or counts["messages"] == expected:
                await message.ack(multiple=True)
            if counts["messages"] == expected and not done.done():
                done.set_result(time.perf_counter())

        started = time.perf_counter()
        tag = await queue.consume(on_message)
        finished = await asyncio.wait_for(done, limit_s)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return BareResult(counts["messages"], counts["ips"], finished - started)
    finally:
        await connection.close()
