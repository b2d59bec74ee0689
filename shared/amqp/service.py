"""What a service holds: a publisher with confirms (``publisher.py``), and consumers that
decode at the edge, dead-letter what can never succeed, requeue transient failures and ack only
once the work is durable (or hand a ticket to the handler, which acks later). Every delivery is
settled, even one whose dead letter cannot be published; a keeper checks the topology while the
service runs. ``shared.disposition`` decides what becomes of each delivery; ``Consumer`` carries
it out, and ``Amqp.consume`` starts one consumer per route a service wires (``shared.routes``)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
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
from shared.disposition import (
    TRANSIENT_BACKOFF,
    Ack,
    DeadLetter,
    DeadLettered,
    DeadLetterFailed,
    Disposition,
    Failed,
    Handled,
    Held,
    Leave,
    Outcome,
    Refused,
    RejectWithoutRequeue,
    Requeue,
    TransientFailure,
    Unanswered,
    disposition,
)
from shared.errors import Rejected, ServiceFault, TopologyLost, Transient
from shared.metrics import ConsumerHealth, Health, MetricsRegistry, health_of
from shared.ports import Ticket
from shared.routes import Answers, Deferred, Handler, Route, Wired, Wiring, queue_of
from shared.settings import split_amqp_urls

M = TypeVar("M", bound=BaseModel)

log = structlog.get_logger("shared.amqp")

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


class ConsumedQueue(Protocol):
    """What a consumer needs of its queue: an aio-pika queue, or an in-memory one."""

    @property
    def name(self) -> str: ...

    async def consume(
        self, callback: Callable[[AbstractIncomingMessage], Awaitable[Any]], /
    ) -> str: ...

    async def cancel(self, consumer_tag: str, /) -> object: ...


class DeadLetterer(Protocol):
    """Publishes a copy of a delivery (or of its rejected part) to ``bangui.dlx``."""

    async def dead_letter(
        self,
        message: AbstractIncomingMessage,
        *,
        route: str,
        reason: str,
        service: str,
        queue: str,
        body: bytes | None = None,
    ) -> None: ...


class Replier(Protocol):
    """Publishes a request's reply at its ``reply_to``, with its correlation id."""

    async def reply(self, request: AbstractIncomingMessage, body: bytes, /) -> None: ...


@dataclass(frozen=True)
class ChannelReplier:
    """Replies on the consumer's own channel (``shared.amqp.requests.publish_reply``)."""

    channel: AbstractChannel
    timeout: float

    async def reply(self, request: AbstractIncomingMessage, body: bytes, /) -> None:
        await publish_reply(self.channel, request, body, self.timeout)


@dataclass
class Consumer(Generic[M]):
    """One queue, one channel, one route and its handler; counts what it did. What becomes of
    each delivery is ``shared.disposition``'s decision; this class carries it out."""

    service: str
    queue: ConsumedQueue
    spec: topology.QueueSpec  # its binding keys: anything else arrived by CC/BCC or by name
    route: Route[M]
    handler: Handler[M]
    publisher: DeadLetterer
    replier: Replier
    max_bytes: int
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

    @property
    def dead_letter_route(self) -> str:
        """What the queue is for: its dead letters' routing key on ``bangui.dlx``."""
        return self.spec.route

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
        outcome = await self._outcome(message)
        await self._apply(message, disposition(outcome, redelivered=bool(message.redelivered)))

    async def _outcome(self, message: AbstractIncomingMessage) -> Outcome:
        try:
            if message.routing_key not in self.spec.routing_keys:
                # RabbitMQ 3.x topic permissions don't check CC/BCC headers, and the default
                # exchange routes by queue name: refuse what the topology would not route here.
                raise Rejected(
                    f"routing key {message.routing_key!r} is not bound to {self.queue.name}"
                )
            handler = self.handler
            if isinstance(handler, Answers):
                return await self._answer(message, handler)
            model = await self._decode(message)
            if isinstance(handler, Deferred):
                await handler.handle(model, AmqpTicket(message, self))
                return Held()  # the handler settles the ticket later
            await handler.handle(model)
            return Handled()
        except Rejected as exc:
            return Refused(exc.reason)
        except Transient as exc:
            log.warning(
                "message_requeued",
                queue=self.queue.name,
                reason=str(exc),
                backoff_s=TRANSIENT_BACKOFF,
            )
            return TransientFailure(str(exc))
        except Exception as exc:
            twice = "message_failed_twice" if message.redelivered else "message_failed"
            log.exception(twice, queue=self.queue.name)
            return Failed(repr(exc))

    async def _apply(self, message: AbstractIncomingMessage, action: Disposition) -> None:
        match action:
            case Ack():
                await self._settle(message)
            case Leave():
                pass
            case Requeue(backoff_s=backoff):
                if backoff:
                    await asyncio.sleep(backoff)
                await self._settle(message, requeue=True)
            case DeadLetter(reason=reason):
                outcome = await self._dead_letter(message, reason)
                redelivered = bool(message.redelivered)
                await self._apply(message, disposition(outcome, redelivered=redelivered))
            case RejectWithoutRequeue():
                await self._settle(message, reject=True)

    async def _answer(self, message: AbstractIncomingMessage, handler: Answers[M]) -> Outcome:
        """A request: the reply (or ``{"error": ...}`` for a malformed one) goes to its
        ``reply_to`` before the ack; without a ``reply_to`` nobody could read an answer, so it
        is dead-lettered like any malformed message. A redelivered request is acked unanswered
        (see below)."""
        if not message.reply_to:
            try:
                decode(self.route.model, message.body, self.max_bytes)
            except Rejected as exc:
                raise Rejected(f"{exc.reason} (and no reply_to to answer)") from None
            raise Rejected("a request needs a reply_to property to be answered")
        if message.redelivered:
            # Its first answer was cut off. Whoever asked waits a bounded time and falls back,
            # so a late answer helps nobody, and one to a requester whose broker node has gone
            # down makes RabbitMQ 3.x close this whole connection (INTERNAL_ERROR, from
            # rabbit_channel:deliver_reply): answered again, such a request would do that at
            # every reconnect and keep this service off its queues.
            log.info(
                "request_dropped_redelivered", queue=self.queue.name, reply_to=message.reply_to
            )
            return Unanswered()
        try:
            model = decode(self.route.model, message.body, self.max_bytes)
        except Rejected as exc:
            log.warning("request_refused", queue=self.queue.name, reason=exc.reason)
            reply = json.dumps({"error": exc.reason}).encode()
        else:
            try:
                reply = await handler.handle(model)
            except Exception as exc:
                # The requester waits a bounded time and falls back; a retry or a dead letter
                # would only answer someone who stopped waiting.
                log.warning("request_unanswered", queue=self.queue.name, error=repr(exc)[:300])
                return Unanswered()
        try:
            await self.replier.reply(message, reply)
        except (TimeoutError, AMQPConnectionError, ChannelInvalidStateError) as exc:
            raise Transient(f"reply to {message.reply_to} not confirmed: {exc!r}") from exc
        self.replied += 1
        return Handled()

    async def _decode(self, message: AbstractIncomingMessage) -> M:
        """The model of the message; for a partly bad one that ``salvage`` can split, the
        valid part, once the invalid part is dead-lettered (if that publish fails, the whole
        message is rejected instead, as without salvage)."""
        model, salvage = self.route.model, self.route.salvage
        try:
            return decode(model, message.body, self.max_bytes)
        except Rejected:
            if salvage is None or len(message.body) > self.max_bytes:
                raise  # a body over the limit is never read, partly or whole
            part = salvage(message.body)
            if part is None or not isinstance(part.kept, model):
                raise
            try:
                await self.publisher.dead_letter(
                    message,
                    route=self.dead_letter_route,
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

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> Outcome:
        """Publish a copy to ``bangui.dlx``; whether it was published decides how the delivery
        is settled (acked, or rejected without requeue: the broker dead-letters it where the
        queue has a dead-letter exchange, and drops it where not)."""
        try:
            await self.publisher.dead_letter(
                message,
                route=self.dead_letter_route,
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
            return DeadLetterFailed(reason)
        self.dead_lettered += 1
        log.warning(
            "message_dead_lettered",
            queue=self.queue.name,
            routing_key=message.routing_key,
            reason=reason,
            bytes=len(message.body),
        )
        return DeadLettered()

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

    async def consume(self, wiring: Wiring, *, prefetch: int) -> None:
        """Start a consumer per wired route, each on a channel of its own (so acks and prefetch
        are per queue); ``prefetch`` for the routes whose table entry names none."""
        for wired in wiring:
            limit = wired.route.prefetch
            await self.consume_route(wired, prefetch=prefetch if limit is None else limit)

    async def consume_route(self, wired: Wired[M], *, prefetch: int) -> Consumer[M]:
        """Consume the route's queue: the shared one, its bindings restored at once if one was
        deleted, or for a per-replica queue (geo.flush: each resolver replica gets every one)
        an exclusive queue of this process's own, bound here."""
        spec = queue_of(wired.route)
        if not spec.per_replica:
            bindings = own_bindings(spec.name, spec.routing_keys)
            await self.keeper.ensure_bindings(bindings)
            self.keeper.own.extend(bindings)
        channel = await open_channel(self.connection, prefetch)
        self._channels.append(channel)
        if spec.per_replica:
            name = spec.replica_name(f"{socket.gethostname()}.{os.getpid()}")
            queue = await channel.declare_queue(name, exclusive=True, durable=False)
            exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
            for key in spec.routing_keys:
                await queue.bind(exchange, routing_key=key)
            self.keeper.own.extend(own_bindings(name, spec.routing_keys))  # re-bound if deleted
        else:
            queue = await channel.get_queue(spec.name, ensure=True)
        consumer = Consumer(
            self.service,
            queue,
            spec,
            wired.route,
            wired.handler,
            self.publisher,
            ChannelReplier(channel, self.publisher.timeout),
            self.max_bytes,
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
        register_consumer_metrics(registry, self.consumers)

    async def ack(self, tickets: Sequence[Ticket]) -> None:
        """Ack held deliveries from any of this service's consumers."""
        await ack_tickets(self.consumers, tickets)

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
        await stop_consumers(self.consumers, drain_timeout)

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


def register_consumer_metrics(
    registry: MetricsRegistry, consumers: Sequence[Consumer[Any]]
) -> None:
    """Per-queue delivery counters, read from the consumers' own counts."""
    for consumer in consumers:
        for name, kind, help_, read in CONSUMER_METRICS:
            add = registry.counter if kind == "counter" else registry.gauge
            add(name, help_, partial(read, consumer), queue=consumer.queue.name)


async def ack_tickets(consumers: Sequence[Consumer[Any]], tickets: Sequence[Ticket]) -> None:
    """Ack held deliveries, each through the consumer it came from."""
    for consumer in consumers:
        mine = [t for t in tickets if isinstance(t, AmqpTicket) and t.consumer is consumer]
        if mine:
            await consumer.ack(mine)


async def stop_consumers(consumers: Sequence[Consumer[Any]], drain_timeout: float) -> None:
    """Stop every consumer, draining in-flight deliveries within one shared deadline."""
    deadline = time.monotonic() + drain_timeout
    for consumer in consumers:
        await consumer.stop(max(0.0, deadline - time.monotonic()))
