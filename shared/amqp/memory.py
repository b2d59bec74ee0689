"""An in-memory broker and transport, so the real bootstraps and the real ``Consumer`` (decode,
disposition, settle, ack, dead letters) run in fast tests without RabbitMQ.

Deliveries are aio-pika's own ``IncomingMessage``, acked, nacked and rejected through an
in-memory channel that numbers them per channel, holds them until settled, honours the prefetch,
and requeues them (marked ``redelivered``) on a nack or when the channel closes. Queues, bindings
and dead-lettering come from ``shared.topology``: topic routing on ``bangui`` (CC/BCC headers
included, as RabbitMQ does), ``bangui.dlx`` bound with ``#`` to ``geo.dead_letter``, the default
exchange by queue name and to requesters' direct reply-to names. Not modelled: message TTLs,
queue limits, publisher confirms failing, reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aiormq
from aio_pika import IncomingMessage
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from shared import topology
from shared.amqp.config import AmqpConfig
from shared.amqp.publisher import ServicePublisher
from shared.amqp.service import (
    DEAD_LETTER_FAILING_S,
    Consumer,
    ack_tickets,
    register_consumer_metrics,
    stop_consumers,
)
from shared.metrics import Health, MetricsRegistry, health_of
from shared.ports import Ticket
from shared.routes import Wired, Wiring, queue_of

DEFAULT_EXCHANGE = ""
Callback = Callable[[AbstractIncomingMessage], Awaitable[Any]]


class Unroutable(Exception):
    """A mandatory publish that no queue is bound for (RabbitMQ returns it)."""


@dataclass
class Envelope:
    """A message as the broker holds it."""

    body: bytes
    exchange: str
    routing_key: str
    properties: spec.Basic.Properties
    redelivered: bool = False

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


class _NackCapable:
    basic_nack = True  # aio-pika asks the connection whether the broker supports basic.nack


class MemoryChannel:
    """Holds the deliveries of one consumer until they are settled; what aio-pika's
    ``IncomingMessage`` acks, nacks and rejects through."""

    connection = _NackCapable()

    def __init__(self, broker: MemoryBroker, prefetch: int) -> None:
        self._broker = broker
        self.prefetch = prefetch
        self.is_closed = False
        self._tags = itertools.count(1)
        self.unacked: dict[int, tuple[MemoryQueue, Envelope]] = {}

    def has_room(self) -> bool:
        return not self.is_closed and (self.prefetch == 0 or len(self.unacked) < self.prefetch)

    def hold(self, queue: MemoryQueue, envelope: Envelope) -> int:
        tag = next(self._tags)
        self.unacked[tag] = (queue, envelope)
        return tag

    def _take(self, delivery_tag: int, multiple: bool) -> list[tuple[MemoryQueue, Envelope]]:
        if delivery_tag not in self.unacked:
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"unknown delivery tag {delivery_tag}"
            )
        tags = [t for t in self.unacked if t <= delivery_tag] if multiple else [delivery_tag]
        return [self.unacked.pop(t) for t in tags]

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        queues = {queue.name: queue for queue, _ in self._take(delivery_tag, multiple)}
        for queue in queues.values():
            queue.dispatch()

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        for queue, envelope in self._take(delivery_tag, multiple):
            self._broker.settle_negatively(queue, envelope, requeue=requeue)

    async def basic_reject(self, delivery_tag: int, requeue: bool = False) -> None:
        await self.basic_nack(delivery_tag, requeue=requeue)

    def close(self) -> None:
        """Closed with its connection: what it held goes back to its queues, redelivered."""
        self.is_closed = True
        held, self.unacked = self.unacked, {}
        for queue, envelope in reversed(held.values()):
            self._broker.settle_negatively(queue, envelope, requeue=True)


@dataclass
class _Subscription:
    tag: str
    channel: MemoryChannel
    callback: Callback


@dataclass
class MemoryQueue:
    name: str
    dead_letter: bool  # x-dead-letter-exchange: bangui.dlx
    broker: MemoryBroker
    ready: deque[Envelope] = field(default_factory=deque)
    subscriptions: list[_Subscription] = field(default_factory=list)
    _turn: int = 0

    def put(self, envelope: Envelope, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft(envelope)
        else:
            self.ready.append(envelope)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand ready messages to the subscribers with room, in turn."""
        while self.ready:
            open_ = [s for s in self.subscriptions if s.channel.has_room()]
            if not open_:
                return
            sub = open_[self._turn % len(open_)]
            self._turn += 1
            envelope = self.ready.popleft()
            tag = sub.channel.hold(self, envelope)
            self.broker.run(self._deliver(sub, self._delivery(sub, tag, envelope)))

    async def _deliver(self, sub: _Subscription, message: IncomingMessage) -> None:
        if not sub.channel.is_closed:  # else its close requeued the message: never delivered
            await sub.callback(message)

    def _delivery(self, sub: _Subscription, tag: int, envelope: Envelope) -> IncomingMessage:
        deliver = spec.Basic.Deliver(
            consumer_tag=sub.tag,
            delivery_tag=tag,
            redelivered=envelope.redelivered,
            exchange=envelope.exchange,
            routing_key=envelope.routing_key,
        )
        header = ContentHeader(body_size=len(envelope.body), properties=envelope.properties)
        # The channel is ours, not aiormq's: IncomingMessage only calls basic_ack/nack/reject.
        channel = cast(aiormq.abc.AbstractChannel, sub.channel)
        return IncomingMessage(DeliveredMessage(deliver, header, envelope.body, channel))


@dataclass
class MemoryQueueHandle:
    """One channel's view of a queue, what a ``Consumer`` consumes from."""

    queue: MemoryQueue
    channel: MemoryChannel

    @property
    def name(self) -> str:
        return self.queue.name

    async def consume(self, callback: Callback, /) -> str:
        tag = f"ctag.{uuid.uuid4().hex[:12]}"
        self.queue.subscriptions.append(_Subscription(tag, self.channel, callback))
        self.queue.dispatch()
        return tag

    async def cancel(self, consumer_tag: str, /) -> object:
        subs = self.queue.subscriptions
        subs[:] = [s for s in subs if s.tag != consumer_tag]
        return None


class MemoryBroker:
    """The exchanges, queues and bindings of ``shared.topology``, in memory; ``open`` connects a
    service to it (``shared.transport.OpenTransport``)."""

    def __init__(self) -> None:
        self.queues: dict[str, MemoryQueue] = {}
        self.bindings: dict[str, list[tuple[str, str]]] = {
            topology.EXCHANGE: [],
            topology.DEAD_LETTER_EXCHANGE: [],
        }
        self.direct_replies: dict[str, Callable[[Envelope], None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replicas = itertools.count(1)
        self.leaders: dict[str, MemoryTransport] = {}  # lock name -> its holder (the timer's)
        for queue_spec in topology.WORK_QUEUES:
            self.declare(queue_spec.name, queue_spec.routing_keys, queue_spec.dead_letter)
        self.declare(
            topology.DEAD_LETTER_QUEUE,
            topology.DEAD_LETTER.routing_keys,
            dead_letter=False,
            exchange=topology.DEAD_LETTER_EXCHANGE,
        )

    async def open(
        self, config: AmqpConfig, *, service: str, stop: asyncio.Event
    ) -> MemoryTransport:
        return MemoryTransport(self, service, config, replica=f"memory.{next(self._replicas)}")

    def declare(
        self,
        name: str,
        routing_keys: Sequence[str],
        dead_letter: bool,
        *,
        exchange: str = topology.EXCHANGE,
    ) -> MemoryQueue:
        queue = self.queues.setdefault(name, MemoryQueue(name, dead_letter, self))
        self.bindings[exchange].extend((key, name) for key in routing_keys)
        return queue

    def delete(self, name: str) -> None:
        self.queues.pop(name, None)
        for exchange, bound in self.bindings.items():
            self.bindings[exchange] = [(key, queue) for key, queue in bound if queue != name]

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool = False,
    ) -> int:
        """Route as RabbitMQ does; returns how many queues took the message."""
        if exchange == DEFAULT_EXCHANGE:
            reply = self.direct_replies.get(routing_key)
            if reply is not None:
                reply(Envelope(body, exchange, routing_key, properties))
                return 1
            targets = [routing_key] if routing_key in self.queues else []
        else:
            headers = dict(properties.headers or {})
            keys = [routing_key, *_keys(headers.get("CC")), *_keys(headers.pop("BCC", None))]
            if "BCC" in (properties.headers or {}):
                properties = _with_headers(properties, headers)  # BCC is never delivered
            targets = list(
                dict.fromkeys(
                    queue
                    for pattern, queue in self.bindings[exchange]
                    for key in keys
                    if topic_matches(pattern, key)
                )
            )
        if mandatory and not targets:
            raise Unroutable(f"no queue bound for {routing_key!r} on {exchange or 'default'}")
        for name in targets:
            self.queues[name].put(Envelope(body, exchange, routing_key, properties))
        return len(targets)

    def settle_negatively(self, queue: MemoryQueue, envelope: Envelope, *, requeue: bool) -> None:
        """A nack or reject: requeued at the head, marked redelivered; or dead-lettered by the
        broker (to ``bangui.dlx``, with an ``x-death`` record) where the queue has a dead-letter
        exchange, and dropped where not."""
        if requeue:
            envelope.redelivered = True
            if queue.name in self.queues:
                queue.put(envelope, front=True)
            return
        if queue.dead_letter:
            headers = envelope.headers
            death = {"queue": queue.name, "reason": "rejected", "count": 1}
            death |= {"exchange": envelope.exchange, "routing-keys": [envelope.routing_key]}
            headers["x-death"] = [death]
            properties = _with_headers(envelope.properties, headers)
            self.publish(
                topology.DEAD_LETTER_EXCHANGE, envelope.routing_key, envelope.body, properties
            )
        queue.dispatch()

    def run(self, work: Awaitable[Any]) -> None:
        """Each delivery is handled in a task of its own, as aio-pika does."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # What tests read and send, as a client of the broker would.

    def send(
        self,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        exchange: str = topology.EXCHANGE,
    ) -> int:
        return self.publish(exchange, routing_key, body, _properties(headers=headers))

    def take(self, name: str) -> list[Envelope]:
        """Everything ready in queue ``name``, removed from it (as a drain that acks)."""
        queue = self.queues[name]
        taken = list(queue.ready)
        queue.ready.clear()
        return taken

    def ready(self, name: str) -> int:
        return len(self.queues[name].ready)


def _keys(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _properties(
    *,
    headers: dict[str, Any] | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    expiration: float | None = None,
    persistent: bool = True,
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2 if persistent else 1,
        headers=headers,
        correlation_id=correlation_id,
        reply_to=reply_to,
        expiration=None if expiration is None else str(max(1, round(expiration * 1000))),
        timestamp=datetime.now(UTC),
    )


def _with_headers(
    properties: spec.Basic.Properties, headers: dict[str, Any]
) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=properties.content_type,
        delivery_mode=properties.delivery_mode,
        headers=headers,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=properties.expiration,
        timestamp=properties.timestamp,
    )


@dataclass
class MemoryPublisher(ServicePublisher):
    """``Publisher`` and dead-letterer of a service on the in-memory broker."""

    broker: MemoryBroker

    async def publish_bodies(
        self,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        for body in bodies:
            properties = _properties(expiration=expiration)
            self.broker.publish(
                topology.EXCHANGE, routing_key, body, properties, mandatory=mandatory
            )

    async def publish_dead_letter(
        self, body: bytes, *, route: str, headers: dict[str, Any]
    ) -> None:
        properties = _properties(headers=headers)
        self.broker.publish(topology.DEAD_LETTER_EXCHANGE, route, body, properties, mandatory=True)


@dataclass
class MemoryReplier:
    broker: MemoryBroker

    async def reply(self, request: AbstractIncomingMessage, body: bytes, /) -> None:
        properties = _properties(correlation_id=request.correlation_id, persistent=False)
        self.broker.publish(DEFAULT_EXCHANGE, request.reply_to or "", body, properties)


@dataclass
class MemoryRequester:
    """Request/reply over the broker's direct reply-to, as ``shared.amqp.requests.Requester``."""

    broker: MemoryBroker

    async def request(
        self, routing_key: str, body: bytes, wait: float, *, expire: bool = True
    ) -> bytes | None:
        reply_to = f"{topology.DIRECT_REPLY_TO}.{uuid.uuid4().hex}"
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def answered(envelope: Envelope) -> None:
            if envelope.properties.correlation_id == correlation_id and not future.done():
                future.set_result(envelope.body)

        self.broker.direct_replies[reply_to] = answered
        try:
            properties = _properties(
                correlation_id=correlation_id, reply_to=reply_to, expiration=wait
            )
            self.broker.publish(topology.EXCHANGE, routing_key, body, properties)
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            return None
        finally:
            self.broker.direct_replies.pop(reply_to, None)


class MemoryTransport:
    """One service's connection to a ``MemoryBroker``: ``shared.transport.Transport``."""

    def __init__(
        self, broker: MemoryBroker, service: str, config: AmqpConfig, *, replica: str
    ) -> None:
        self._broker = broker
        self.service = service
        self.publisher = MemoryPublisher(broker)
        self.consumers: list[Consumer[Any]] = []
        self._max_bytes = config.max_message_bytes
        self._stuck_after_s = config.stuck_after_s
        self._replica = replica
        self._channels: list[MemoryChannel] = []
        self._exclusive: list[str] = []
        self.closed = False

    async def consume(self, wiring: Wiring, *, prefetch: int) -> None:
        for wired in wiring:
            limit = wired.route.prefetch
            await self.consume_route(wired, prefetch=prefetch if limit is None else limit)

    async def consume_route(self, wired: Wired[Any], *, prefetch: int) -> Consumer[Any]:
        spec_ = queue_of(wired.route)
        if spec_.per_replica:
            name = spec_.replica_name(self._replica)
            queue = self._broker.declare(name, spec_.routing_keys, spec_.dead_letter)
            self._exclusive.append(name)
        else:
            queue = self._broker.queues[spec_.name]
        channel = MemoryChannel(self._broker, prefetch)
        self._channels.append(channel)
        consumer: Consumer[Any] = Consumer(
            self.service,
            MemoryQueueHandle(queue, channel),
            spec_,
            wired.route,
            wired.handler,
            self.publisher,
            MemoryReplier(self._broker),
            self._max_bytes,
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def requester(self) -> MemoryRequester:
        return MemoryRequester(self._broker)

    async def ack(self, tickets: Sequence[Ticket]) -> None:
        await ack_tickets(self.consumers, tickets)

    def health(self) -> Health:
        now = time.monotonic()
        return health_of(
            connected=not self.closed,
            fault=None,
            consumers=[c.health(now) for c in self.consumers],
            stuck_after_s=self._stuck_after_s,
            failing_for_s=DEAD_LETTER_FAILING_S,
        )

    def register_metrics(self, registry: MetricsRegistry) -> None:
        register_consumer_metrics(registry, self.consumers)

    async def stop_consuming(self, drain_timeout: float) -> None:
        await stop_consumers(self.consumers, drain_timeout)

    async def try_lead(self, lock_name: str) -> bool:
        """As the exclusive queue of ``Amqp.try_lead``: held until its holder closes."""
        holder = self._broker.leaders.setdefault(lock_name, self)
        return holder is self

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        pass  # an in-memory connection is never lost

    async def close(self) -> None:
        """As a closed connection: held deliveries requeued, exclusive queues deleted."""
        self.closed = True
        for lock, holder in list(self._broker.leaders.items()):
            if holder is self:
                del self._broker.leaders[lock]
        for name in self._exclusive:
            self._broker.delete(name)
        for channel in self._channels:
            channel.close()
