"""What a service holds: a publisher with confirms (``publisher.py``), and consumers that
decode at the edge, dead-letter what can never succeed, requeue transient failures and ack only
once the work is durable (or hand a ticket to the handler, which acks later). Every delivery is
settled, even one whose dead letter cannot be published; a keeper checks the topology while the
service runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
)
from pydantic import BaseModel

from shared import topology
from shared.acks import plan_acks
from shared.amqp.config import STUCK_AFTER_MIN_S, AmqpConfig
from shared.amqp.connection import (
    close_quietly,
    connect,
    connection_name,
    open_channel,
)
from shared.amqp.keeper import TopologyKeeper, keep_topology, own_bindings
from shared.amqp.lock import LeaderLock
from shared.amqp.publisher import AmqpPublisher
from shared.amqp.requests import Requester, publish_reply
from shared.decode import decode
from shared.errors import Rejected, ServiceFault, TopologyLost, Transient
from shared.metrics import ConsumerHealth, Health, MetricsRegistry, health_of
from shared.ports import Ticket
from shared.salvage import Salvage
from shared.settings import split_amqp_urls

M = TypeVar("M", bound=BaseModel)

log = structlog.get_logger("shared.amqp")

TRANSIENT_BACKOFF = 1.0
DEAD_LETTER_FAILING_S = 300.0  # /health reports a failed dead letter for this long

MetricKind = Literal["counter", "gauge"]
# name, kind, help, how to read it from a consumer: /metrics' per-queue delivery counters.
CONSUMER_METRICS: tuple[tuple[str, MetricKind, str, Callable[[Consumer[Any]], float]], ...] = (
    ("geo_messages_consumed_total", "counter", "Deliveries received.", lambda c: c.consumed),
    ("geo_dead_letters_total", "counter", "Sent to geo.dead_letter.", lambda c: c.dead_lettered),
    (
        "geo_dead_letter_failures_total",
        "counter",
        "Dead letters that could not be published (rejected to the broker instead).",
        lambda c: c.dead_letter_failures,
    ),
    (
        "geo_messages_partly_dead_lettered_total",
        "counter",
        "Handled for their valid part; the invalid part sent to geo.dead_letter.",
        lambda c: c.partly_dead_lettered,
    ),
    ("geo_messages_requeued_total", "counter", "Requeued after a failure.", lambda c: c.requeued),
    ("geo_deliveries_unacked", "gauge", "Received, not yet settled.", lambda c: c.unsettled),
)


@dataclass(frozen=True)
class AmqpTicket:
    """A held delivery; the resolver acks it once the rows it produced are confirmed downstream."""

    message: AbstractIncomingMessage
    consumer: Consumer[Any]


Handler = Callable[[M], Awaitable[None]]
RequestHandler = Callable[[M], Awaitable[bytes]]  # returns the reply's body
DeferredHandler = Callable[[M, AmqpTicket], Awaitable[None]]
Salvager = Callable[[bytes], Salvage | None]


@dataclass
class Consumer(Generic[M]):
    """One queue, one channel, one model, one handler; counts what it did."""

    service: str
    queue: AbstractQueue
    model: type[M]
    handler: Handler[M] | None
    deferred_handler: DeferredHandler[M] | None
    publisher: AmqpPublisher
    max_bytes: int
    routing_keys: frozenset[str]  # exact binding keys: anything else arrived by CC/BCC or by name
    route: str  # what the queue is for: its dead letters' routing key on bangui.dlx
    salvage: Salvager | None = None  # keeps the valid part of a message that is partly bad
    request_handler: RequestHandler[M] | None = None  # answers at the delivery's reply_to
    reply_channel: AbstractChannel | None = None
    replied: int = 0
    consumed: int = 0
    partly_dead_lettered: int = 0
    dead_lettered: int = 0
    dead_letter_failures: int = 0
    requeued: int = 0
    _tag: str | None = None
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)
    _unsettled: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
    _received_at: dict[int, float] = field(default_factory=dict)  # monotonic, per unsettled tag
    _dead_letter_failed_at: float | None = None
    _channel: object = None

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message)

    async def stop(self, drain_timeout: float) -> None:
        """Stop taking deliveries, then wait (bounded) for the ones being handled."""
        if self._tag is not None:
            with suppress(AMQPConnectionError, ChannelInvalidStateError, RuntimeError):
                await self.queue.cancel(self._tag)
            self._tag = None
        pending = {t for t in self._in_flight if not t.done()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=drain_timeout)
            for task in still:
                task.cancel()

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def health(self, now: float) -> ConsumerHealth:
        oldest = next(iter(self._unsettled), None)  # tags grow: the first is the oldest
        since = self._received_at.get(oldest) if oldest is not None else None
        failed = self._dead_letter_failed_at
        return ConsumerHealth(
            self.queue.name,
            None if since is None else now - since,
            None if failed is None else now - failed,
        )

    def _forget(self, tag: int) -> None:
        self._unsettled.pop(tag, None)
        self._received_at.pop(tag, None)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        if message.channel is not self._channel:
            # A new channel after a reconnect numbers its deliveries from 1 again; the old
            # channel's deliveries are redelivered by the broker, so forget them.
            self._channel = message.channel
            self._unsettled.clear()
            self._received_at.clear()
        tag = message.delivery_tag
        if tag is not None:
            self._unsettled[tag] = message
            self._received_at[tag] = time.monotonic()
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        self.consumed += 1
        try:
            if message.routing_key not in self.routing_keys:
                # RabbitMQ 3.x topic permissions don't check CC/BCC headers, and the default
                # exchange routes by queue name: refuse what the topology would not route here.
                raise Rejected(
                    f"routing key {message.routing_key!r} is not bound to {self.queue.name}"
                )
            if self.request_handler is not None:
                await self._answer(message)
                return
            model = await self._decode(message)
            if self.deferred_handler is not None:
                await self.deferred_handler(model, AmqpTicket(message, self))
                return  # the handler settles the ticket later
            assert self.handler is not None
            await self.handler(model)
        except Rejected as exc:
            await self._reject(message, exc.reason)
        except Transient as exc:
            log.warning(
                "message_requeued",
                queue=self.queue.name,
                reason=str(exc),
                backoff_s=TRANSIENT_BACKOFF,
            )
            await asyncio.sleep(TRANSIENT_BACKOFF)
            await self._settle(message, requeue=True)
        except Exception as exc:
            if message.redelivered:
                log.exception("message_failed_twice", queue=self.queue.name)
                await self._reject(message, f"handler failed on redelivery: {exc!r}"[:500])
            else:
                log.exception("message_failed", queue=self.queue.name)
                await self._settle(message, requeue=True)
        else:
            await self._settle(message)

    async def _answer(self, message: AbstractIncomingMessage) -> None:
        """A request: the reply (or ``{"error": ...}`` for a malformed one) goes to its
        ``reply_to`` before the ack; without a ``reply_to`` nobody could read an answer, so it
        is dead-lettered like any malformed message."""
        assert self.request_handler is not None
        assert self.reply_channel is not None
        if not message.reply_to:
            try:
                decode(self.model, message.body, self.max_bytes)
            except Rejected as exc:
                raise Rejected(f"{exc.reason} (and no reply_to to answer)") from None
            raise Rejected("a request needs a reply_to property to be answered")
        try:
            model = decode(self.model, message.body, self.max_bytes)
        except Rejected as exc:
            log.warning("request_refused", queue=self.queue.name, reason=exc.reason)
            reply = json.dumps({"error": exc.reason}).encode()
        else:
            try:
                reply = await self.request_handler(model)
            except Exception as exc:
                # The requester waits a bounded time and falls back; a retry or a dead letter
                # would only answer someone who stopped waiting.
                log.warning("request_unanswered", queue=self.queue.name, error=repr(exc)[:300])
                await self._settle(message)
                return
        try:
            await publish_reply(self.reply_channel, message, reply, self.publisher.timeout)
        except (TimeoutError, AMQPConnectionError, ChannelInvalidStateError) as exc:
            raise Transient(f"reply to {message.reply_to} not confirmed: {exc!r}") from exc
        self.replied += 1
        await self._settle(message)

    async def _decode(self, message: AbstractIncomingMessage) -> M:
        """The model of the message; for a partly bad one that ``salvage`` can split, the
        valid part, once the invalid part is dead-lettered (if that publish fails, the whole
        message is rejected instead, as without salvage)."""
        try:
            return decode(self.model, message.body, self.max_bytes)
        except Rejected:
            if self.salvage is None or len(message.body) > self.max_bytes:
                raise  # a body over the limit is never read, partly or whole
            part = self.salvage(message.body)
            if part is None or not isinstance(part.kept, self.model):
                raise
            try:
                await self.publisher.dead_letter(
                    message,
                    route=self.route,
                    reason=part.reason,
                    service=self.service,
                    queue=self.queue.name,
                    body=part.rejected_body,
                )
            except Exception as exc:
                log.warning("message_part_dead_letter_failed", error=repr(exc))
                raise Rejected(part.reason) from None
            self.partly_dead_lettered += 1
            log.warning(
                "message_partly_dead_lettered",
                queue=self.queue.name,
                invalid=part.invalid,
                kept=len(part.kept.addresses),
                reason=part.reason,
            )
            return part.kept

    async def _reject(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter a copy, then ack; if the copy cannot be published, reject without
        requeue (the broker dead-letters it where the queue has a dead-letter exchange, and
        drops it where not): a poison message never stays unsettled."""
        try:
            await self.publisher.dead_letter(
                message,
                route=self.route,
                reason=reason,
                service=self.service,
                queue=self.queue.name,
            )
        except Exception as exc:
            self.dead_letter_failures += 1
            self._dead_letter_failed_at = time.monotonic()
            log.error(
                "message_dead_letter_failed",
                queue=self.queue.name,
                routing_key=message.routing_key,
                reason=reason,
                error=repr(exc),
                settled="rejected without requeue",
            )
            await self._settle(message, reject=True)
            return
        self.dead_lettered += 1
        log.warning(
            "message_dead_lettered",
            queue=self.queue.name,
            routing_key=message.routing_key,
            reason=reason,
            bytes=len(message.body),
        )
        await self._settle(message)

    async def _settle(
        self, message: AbstractIncomingMessage, *, requeue: bool = False, reject: bool = False
    ) -> None:
        if message.delivery_tag is not None:
            self._forget(message.delivery_tag)
        try:
            if requeue:
                self.requeued += 1
                await message.nack(requeue=True)
            elif reject:
                await message.reject(requeue=False)
            else:
                await message.ack()
        except (AMQPConnectionError, ChannelInvalidStateError, RuntimeError) as exc:
            # The channel is gone: the broker redelivers this message, nothing is lost.
            log.warning("ack_skipped", queue=self.queue.name, error=repr(exc))

    async def ack(self, tickets: Sequence[Ticket]) -> None:
        """Ack held deliveries, with one ``multiple=True`` ack where the tags allow it."""
        messages = [t.message for t in tickets if isinstance(t, AmqpTicket) and t.consumer is self]
        current = [m for m in messages if self._unsettled.get(m.delivery_tag or -1) is m]
        by_tag = {m.delivery_tag: m for m in current if m.delivery_tag is not None}
        multiple, singles = plan_acks(self._unsettled.keys(), by_tag.keys())
        try:
            if multiple is not None:
                for tag in [t for t in self._unsettled if t <= multiple]:
                    self._forget(tag)
                await by_tag[multiple].ack(multiple=True)
            for tag in singles:
                self._forget(tag)
                await by_tag[tag].ack()
        except (AMQPConnectionError, ChannelInvalidStateError, RuntimeError) as exc:
            log.warning("ack_skipped", queue=self.queue.name, error=repr(exc))
        stale = len(messages) - len(current)
        if stale:
            log.warning("ack_skipped", queue=self.queue.name, stale_deliveries=stale)


@dataclass
class Amqp:
    """A service's connection, its publisher channels, its consumers and the keeper of its
    topology; closed in reverse order."""

    service: str
    connection: AbstractRobustConnection
    channel: AbstractChannel
    publisher: AmqpPublisher
    max_bytes: int
    keeper: TopologyKeeper
    stop: asyncio.Event
    stuck_after_s: float = STUCK_AFTER_MIN_S
    consumers: list[Consumer[Any]] = field(default_factory=list)
    fault: str | None = None  # the topology was lost for good: the service stops on it
    _channels: list[AbstractChannel] = field(default_factory=list)
    _keeping: asyncio.Task[None] | None = None
    _leader_lock: LeaderLock = field(default_factory=LeaderLock)
    _requesters: list[Requester] = field(default_factory=list)

    @classmethod
    async def open(cls, config: AmqpConfig, *, service: str, stop: asyncio.Event) -> Amqp:
        """Connect and make sure the topology is there; what is missing and may not be created
        raises ``TopologyLost`` (one line). Later losses set ``stop`` (see ``close``)."""
        connection = await connect(config.url, name=connection_name(service))
        try:
            user = unquote(urlsplit(split_amqp_urls(config.url)[0]).username or "guest")
            keeper = TopologyKeeper(connection, user, config.queue_type)
            await keeper.ensure()
            channel = await open_channel(connection)
            publisher = await AmqpPublisher.create(channel, connection, config.publish_timeout)
        except BaseException:
            await connection.close()
            raise
        amqp = cls(
            service,
            connection,
            channel,
            publisher,
            config.max_message_bytes,
            keeper,
            stop,
            config.stuck_after_s,
        )
        wake = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: wake.set())
        amqp._keeping = asyncio.create_task(keep_topology(keeper, wake, amqp._lost))
        return amqp

    def _lost(self, exc: TopologyLost) -> None:
        self.fault = str(exc)
        self.stop.set()

    async def consume(
        self,
        spec: topology.QueueSpec,
        model: type[M],
        *,
        prefetch: int,
        handler: Handler[M] | None = None,
        deferred_handler: DeferredHandler[M] | None = None,
        salvage: Salvager | None = None,
        request_handler: RequestHandler[M] | None = None,
    ) -> Consumer[M]:
        """Start consuming ``spec`` on a channel of its own (so acks and prefetch are per queue).
        ``salvage`` splits a rejected body into a valid part to handle and a part to
        dead-letter (``shared.salvage``); ``request_handler`` answers each delivery at its
        ``reply_to`` (``shared.amqp.requests``)."""
        bindings = own_bindings(spec.name, spec.routing_keys)
        await self.keeper.ensure_bindings(bindings)  # restored at once if one was deleted
        self.keeper.own.extend(bindings)
        channel = await open_channel(self.connection, prefetch)
        self._channels.append(channel)
        queue = await channel.get_queue(spec.name, ensure=True)
        return await self._start(
            queue,
            spec.routing_keys,
            spec.route,
            model,
            handler,
            deferred_handler,
            salvage,
            request_handler,
            channel,
        )

    async def consume_private(
        self,
        name: str,
        routing_keys: Sequence[str],
        model: type[M],
        *,
        prefetch: int,
        handler: Handler[M],
    ) -> Consumer[M]:
        """Consume an exclusive queue of this process's own, so it gets a copy of every message
        with ``routing_keys`` (e.g. each resolver replica gets every geo.flush)."""
        channel = await open_channel(self.connection, prefetch)
        self._channels.append(channel)
        queue = await channel.declare_queue(name, exclusive=True, durable=False)
        exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
        for key in routing_keys:
            await queue.bind(exchange, routing_key=key)
        self.keeper.own.extend(own_bindings(name, routing_keys))  # re-bound if deleted
        return await self._start(queue, routing_keys, routing_keys[0], model, handler, None)

    async def _start(
        self,
        queue: AbstractQueue,
        routing_keys: Sequence[str],
        route: str,
        model: type[M],
        handler: Handler[M] | None,
        deferred_handler: DeferredHandler[M] | None,
        salvage: Salvager | None = None,
        request_handler: RequestHandler[M] | None = None,
        reply_channel: AbstractChannel | None = None,
    ) -> Consumer[M]:
        consumer = Consumer(
            self.service,
            queue,
            model,
            handler,
            deferred_handler,
            self.publisher,
            self.max_bytes,
            frozenset(routing_keys),
            route,
            salvage,
            request_handler,
            reply_channel,
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    def health(self) -> Health:
        """For /health: connected (a robust connection may be reconnecting), the topology
        kept, no delivery held too long, no dead letter failed lately."""
        now = time.monotonic()
        return health_of(
            connected=not self.connection.is_closed and self.connection.connected.is_set(),
            fault=self.fault,
            consumers=[c.health(now) for c in self.consumers],
            stuck_after_s=self.stuck_after_s,
            failing_for_s=DEAD_LETTER_FAILING_S,
        )

    def register_metrics(self, registry: MetricsRegistry) -> None:
        """Per-queue delivery counters, read from the consumers' own counts."""
        for consumer in self.consumers:
            for name, kind, help_, read in CONSUMER_METRICS:
                add = registry.counter if kind == "counter" else registry.gauge
                add(name, help_, partial(read, consumer), queue=consumer.queue.name)

    async def ack(self, tickets: Sequence[Ticket]) -> None:
        """Ack held deliveries from any of this service's consumers."""
        for consumer in self.consumers:
            mine = [t for t in tickets if isinstance(t, AmqpTicket) and t.consumer is consumer]
            if mine:
                await consumer.ack(mine)

    async def try_lead(self, lock_name: str) -> bool:
        """Become, or check that we still are, the one holder of ``lock_name``: an exclusive
        queue the broker deletes when its holder's connection dies. False while another
        connection holds it.

        The queue is not part of the robust channel's restore: after a reconnect another timer
        may hold it, and a failing restore would fail every reconnect attempt. The holder calls
        this again instead, and steps down on False. ``LeaderLock`` says why the attempts use a
        channel of their own, kept across checks.
        """
        return await self._leader_lock.attempt(self.connection, lock_name)

    async def requester(self) -> Requester:
        """A request/reply sender over direct reply-to, closed with the service."""
        requester = await Requester.open(self.connection)
        self._requesters.append(requester)
        return requester

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the robust connection has been restored."""
        self.connection.reconnect_callbacks.add(lambda *_: callback())

    async def stop_consuming(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        for consumer in self.consumers:
            await consumer.stop(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        """Close everything; raise ``ServiceFault`` if the service stopped on a lost topology."""
        if self._keeping is not None:
            self._keeping.cancel()
            await asyncio.gather(self._keeping, return_exceptions=True)
        for requester in self._requesters:
            await requester.close()
        await self.publisher.close()
        with suppress(Exception):  # best effort, as for the channels: the connection goes next
            await self._leader_lock.close()
        for channel in reversed([self.channel, *self._channels]):
            await close_quietly(channel)
        await self.connection.close()
        if self.fault is not None:
            raise ServiceFault(self.fault)
