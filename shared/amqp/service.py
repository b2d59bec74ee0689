"""What a service holds: a publisher with confirms, and consumers that decode at the edge,
dead-letter what can never succeed, requeue transient failures and ack only once the work is
durable (or hand a ticket to the handler, which acks later)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
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
from shared.amqp.connection import (
    close_quietly,
    connect,
    connection_name,
    declare_topology,
    json_message,
    open_channel,
)
from shared.amqp.lock import LeaderLock
from shared.decode import decode
from shared.errors import Rejected, Transient
from shared.metrics import MetricsRegistry
from shared.ports import Ticket
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)

log = structlog.get_logger("shared.amqp")

TRANSIENT_BACKOFF = 1.0


class AmqpPublisher:
    """Publishes on ``bangui`` with confirms; a group of publishes is confirmed together."""

    def __init__(self, exchange: AbstractExchange, dlx: AbstractExchange, timeout: float) -> None:
        self._exchange = exchange
        self._dlx = dlx
        self._timeout = timeout

    @classmethod
    async def create(cls, channel: AbstractChannel, confirm_timeout: float) -> AmqpPublisher:
        exchange = await channel.get_exchange(topology.EXCHANGE)
        dlx = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE)
        return cls(exchange, dlx, confirm_timeout)

    async def publish(
        self,
        routing_key: str,
        messages: Sequence[BaseModel],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        await self.publish_bodies(
            routing_key,
            [m.model_dump_json().encode() for m in messages],
            expiration=expiration,
            mandatory=mandatory,
        )

    async def publish_bodies(
        self,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for every confirm; ``mandatory`` raises when no queue is bound."""
        try:
            await asyncio.gather(
                *(
                    self._exchange.publish(
                        json_message(body, expiration=expiration, headers=None),
                        routing_key,
                        mandatory=mandatory,
                        timeout=self._timeout,
                    )
                    for body in bodies
                )
            )
        except (TimeoutError, AMQPConnectionError, ChannelInvalidStateError) as exc:
            raise Transient(f"publish to {routing_key} not confirmed: {exc!r}") from exc

    async def dead_letter(
        self, body: bytes, *, routing_key: str, reason: str, service: str, queue: str
    ) -> None:
        headers = {
            topology.REASON_HEADER: reason,
            topology.SERVICE_HEADER: service,
            topology.QUEUE_HEADER: queue,
            topology.ROUTING_KEY_HEADER: routing_key,
        }
        await self._dlx.publish(
            json_message(body, expiration=None, headers=headers), routing_key, timeout=self._timeout
        )


@dataclass(frozen=True)
class AmqpTicket:
    """A held delivery; the resolver acks it once the rows it produced are confirmed downstream."""

    message: AbstractIncomingMessage
    consumer: Consumer[Any]


Handler = Callable[[M], Awaitable[None]]
DeferredHandler = Callable[[M, AmqpTicket], Awaitable[None]]


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
    consumed: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    _tag: str | None = None
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)
    _unsettled: dict[int, AbstractIncomingMessage] = field(default_factory=dict)
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

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        if message.channel is not self._channel:
            # A new channel after a reconnect numbers its deliveries from 1 again; the old
            # channel's deliveries are redelivered by the broker, so forget them.
            self._channel = message.channel
            self._unsettled.clear()
        tag = message.delivery_tag
        if tag is not None:
            self._unsettled[tag] = message
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
            model = decode(self.model, message.body, self.max_bytes)
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

    async def _reject(self, message: AbstractIncomingMessage, reason: str) -> None:
        self.dead_lettered += 1
        log.warning(
            "message_dead_lettered",
            queue=self.queue.name,
            routing_key=message.routing_key,
            reason=reason,
            bytes=len(message.body),
        )
        await self.publisher.dead_letter(
            message.body,
            routing_key=message.routing_key or "",
            reason=reason,
            service=self.service,
            queue=self.queue.name,
        )
        await self._settle(message)

    async def _settle(self, message: AbstractIncomingMessage, *, requeue: bool = False) -> None:
        if message.delivery_tag is not None:
            self._unsettled.pop(message.delivery_tag, None)
        try:
            if requeue:
                self.requeued += 1
                await message.nack(requeue=True)
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
                    del self._unsettled[tag]
                await by_tag[multiple].ack(multiple=True)
            for tag in singles:
                self._unsettled.pop(tag, None)
                await by_tag[tag].ack()
        except (AMQPConnectionError, ChannelInvalidStateError, RuntimeError) as exc:
            log.warning("ack_skipped", queue=self.queue.name, error=repr(exc))
        stale = len(messages) - len(current)
        if stale:
            log.warning("ack_skipped", queue=self.queue.name, stale_deliveries=stale)


@dataclass
class Amqp:
    """A service's connection, its publisher channel and its consumers; closed in reverse order."""

    service: str
    connection: AbstractRobustConnection
    channel: AbstractChannel
    publisher: AmqpPublisher
    max_bytes: int
    consumers: list[Consumer[Any]] = field(default_factory=list)
    _channels: list[AbstractChannel] = field(default_factory=list)
    _leader_lock: LeaderLock = field(default_factory=LeaderLock)

    @classmethod
    async def open(cls, settings: Settings, *, service: str) -> Amqp:
        connection = await connect(settings.amqp_url, name=connection_name(service))
        channel = await open_channel(connection)
        await declare_topology(channel, settings.queue_type)
        publisher = await AmqpPublisher.create(channel, settings.publish_timeout)
        return cls(service, connection, channel, publisher, settings.max_message_bytes)

    async def consume(
        self,
        spec: topology.QueueSpec,
        model: type[M],
        *,
        prefetch: int,
        handler: Handler[M] | None = None,
        deferred_handler: DeferredHandler[M] | None = None,
    ) -> Consumer[M]:
        """Start consuming ``spec`` on a channel of its own (so acks and prefetch are per queue)."""
        channel = await open_channel(self.connection, prefetch)
        self._channels.append(channel)
        queue = await channel.get_queue(spec.name, ensure=True)
        return await self._start(queue, spec.routing_keys, model, handler, deferred_handler)

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
        exchange = await channel.get_exchange(topology.EXCHANGE)
        for key in routing_keys:
            await queue.bind(exchange, routing_key=key)
        return await self._start(queue, routing_keys, model, handler, None)

    async def _start(
        self,
        queue: AbstractQueue,
        routing_keys: Sequence[str],
        model: type[M],
        handler: Handler[M] | None,
        deferred_handler: DeferredHandler[M] | None,
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
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    def healthy(self) -> bool:
        """Connected to the broker right now (a robust connection may be reconnecting)."""
        return not self.connection.is_closed and self.connection.connected.is_set()

    def register_metrics(self, registry: MetricsRegistry) -> None:
        """Per-queue delivery counters, read from the consumers' own counts."""
        rows = (
            ("geo_messages_consumed_total", "counter", "Deliveries received.", "consumed"),
            ("geo_dead_letters_total", "counter", "Sent to geo.dead_letter.", "dead_lettered"),
            ("geo_messages_requeued_total", "counter", "Requeued after a failure.", "requeued"),
            ("geo_deliveries_unacked", "gauge", "Received, not yet settled.", "unsettled"),
        )
        for consumer in self.consumers:
            for name, kind, help_, attribute in rows:
                add = registry.counter if kind == "counter" else registry.gauge
                add(name, help_, partial(getattr, consumer, attribute), queue=consumer.queue.name)

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

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the robust connection has been restored."""
        self.connection.reconnect_callbacks.add(lambda *_: callback())

    async def stop_consuming(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        for consumer in self.consumers:
            await consumer.stop(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        with suppress(Exception):  # best effort, as for the channels: the connection goes next
            await self._leader_lock.close()
        for channel in reversed([self.channel, *self._channels]):
            await close_quietly(channel)
        await self.connection.close()
