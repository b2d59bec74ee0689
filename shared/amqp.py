"""All AMQP plumbing, and the only module that imports aio_pika.

It connects (robustly, with bounded retries, to one broker or in turn to the nodes of a cluster),
declares the topology, publishes models with publisher confirms, and consumes queues: it decodes
each body into its model at the edge, sends what can never succeed to ``geo.dead_letter`` with
the reason in a header, requeues transient failures after a back-off, and acks only after the
handler's effect is durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.exceptions import ChannelLockedResource
from pydantic import BaseModel

from shared import topology
from shared.acks import plan_acks
from shared.decode import decode
from shared.errors import Rejected, Transient
from shared.metrics import MetricsRegistry
from shared.ports import Ticket
from shared.settings import Settings, split_amqp_urls

M = TypeVar("M", bound=BaseModel)

log = structlog.get_logger("shared.amqp")

CONNECT_ATTEMPTS = 30
CONNECT_DELAY_MAX = 2.0
TRANSIENT_BACKOFF = 1.0


async def connect(url: str, *, attempts: int = CONNECT_ATTEMPTS) -> AbstractRobustConnection:
    """Connect with a bounded number of retries, so any start order of broker and services works.

    ``url`` may list several nodes of one cluster, comma-separated (``GEO_AMQP_URL``): each
    attempt tries them in order, and the connection then fails over to the next node in turn
    whenever it loses its own (``_Failover``). A single URL behaves as it always did.
    """
    urls = split_amqp_urls(url)
    delay = 0.2
    for attempt in range(1, attempts + 1):
        errors: list[str] = []
        for index, candidate in enumerate(urls):
            try:
                connection = await aio_pika.connect_robust(candidate, timeout=10)
            except (TimeoutError, AMQPConnectionError, OSError) as exc:
                if attempt == attempts and index == len(urls) - 1:
                    raise
                error = str(exc) or repr(exc)
                errors.append(error if len(urls) == 1 else f"{_endpoint(candidate)}: {error}")
                continue
            connection.reconnect_callbacks.add(_log_reconnect)
            connection.close_callbacks.add(_log_lost)
            if len(urls) > 1:
                connection.close_callbacks.add(_Failover(urls, index))
            log.info("amqp_connected", attempt=attempt, broker=_endpoint(candidate))
            return connection
        log.warning(
            "amqp_connect_failed", attempt=attempt, retry_in_s=delay, error="; ".join(errors)
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, CONNECT_DELAY_MAX)
    raise AssertionError("unreachable")


@dataclass(eq=False)  # hashed by identity: aio-pika keeps callbacks in a set
class _Failover:
    """Points a robust connection at the next node of its list each time its node is lost or
    refuses a reconnect attempt, round robin: any node of a cluster serves every queue.

    aio-pika's robust connection reconnects to its one URL (``connection.url``, read at each
    attempt); it calls the close callbacks on every loss and on every failed attempt, before it
    schedules the next attempt. Channels, queues, bindings and consumers are then restored on
    the new node as after any reconnect.
    """

    urls: tuple[str, ...]
    index: int

    def __call__(self, connection: Any, _exc: BaseException | None = None) -> None:
        if not isinstance(connection, aio_pika.RobustConnection) or connection.close_called:
            return  # closed on purpose: nothing to fail over to
        self.index = (self.index + 1) % len(self.urls)
        connection.url = make_url(self.urls[self.index])
        log.warning("amqp_broker_switched", broker=_endpoint(self.urls[self.index]))


def _endpoint(url: str) -> str:
    """host:port/vhost of a broker URL, for logs: no user, no password."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return f"{parts.hostname or 'localhost'}:{parts.port or default}{parts.path or '/'}"


def _log_reconnect(connection: Any) -> None:
    url = getattr(connection, "url", None)
    log.warning("amqp_connection_restored", broker=_endpoint(str(url)) if url else None)


def _log_lost(_connection: Any, exc: BaseException | None = None) -> None:
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        log.warning("amqp_connection_lost", error=str(exc) or repr(exc))


async def open_channel(connection: AbstractRobustConnection, prefetch: int = 0) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


async def declare_topology(
    channel: AbstractChannel, queue_type: topology.QueueType = "classic"
) -> dict[str, AbstractQueue]:
    """Declare exchanges, queues and bindings; safe to run from every service at every start."""
    exchange = await channel.declare_exchange(topology.EXCHANGE, ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(
        topology.DEAD_LETTER_EXCHANGE, ExchangeType.TOPIC, durable=True
    )
    queues: dict[str, AbstractQueue] = {}
    for spec, source in [(q, exchange) for q in topology.WORK_QUEUES] + [
        (topology.DEAD_LETTER, dlx)
    ]:
        queue = await channel.declare_queue(
            spec.name, durable=True, arguments=spec.declare_arguments(queue_type) or None
        )
        for key in spec.routing_keys:
            await queue.bind(source, routing_key=key)
        queues[spec.name] = queue
    return queues


def _message(body: bytes, *, expiration: float | None, headers: dict[str, Any] | None) -> Any:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
        headers=headers,
    )


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
                        _message(body, expiration=expiration, headers=None),
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
            _message(body, expiration=None, headers=headers), routing_key, timeout=self._timeout
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

    @classmethod
    async def open(cls, settings: Settings, *, service: str) -> Amqp:
        connection = await connect(settings.amqp_url)
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
        """Try to become the one holder of ``lock_name``, an exclusive queue the broker deletes
        when its holder's connection dies; False while another process holds it."""
        channel = await self.connection.channel()
        try:
            await channel.declare_queue(lock_name, exclusive=True, durable=False)
        except ChannelLockedResource:
            await _close_quietly(channel)
            return False
        self._channels.append(channel)
        return True

    async def stop_consuming(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        for consumer in self.consumers:
            await consumer.stop(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        for channel in reversed([self.channel, *self._channels]):
            await _close_quietly(channel)
        await self.connection.close()


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except Exception as exc:  # closing is best effort: the connection goes next
        log.debug("amqp_channel_close_failed", error=repr(exc))


# --- For tools and other components: one connect attempt, publishing without declaring, and
# --- the dead-letter queue looked at and replayed (the bangui-geo CLI and shared.client).


class BrokerError(Exception):
    """A broker operation of a tool failed; the message says what and why, in one line."""


class BrokerUnreachable(BrokerError):
    """One connection attempt failed; the message names the broker (password hidden) and why."""


class PublishFailed(BrokerError):
    """A publish was not confirmed (no answer, refused, unroutable or the connection was lost)."""


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ProbableAuthenticationError):
        return "login refused (check the user and password)"
    text = str(exc) or repr(exc)
    if "Connection.Close" in text:  # refused at connection.open: unknown vhost or no access
        return "connection refused at open (does the vhost exist, may this user use it?)"
    return text


async def connect_once(url: str, *, connect_timeout: float) -> AbstractRobustConnection:
    """Connect with a single attempt (no retry loop: a tool should fail fast and say why).

    ``url`` may list several nodes of a cluster, comma-separated: each gets one attempt, in
    order. The connection is robust, so a long-lived client recovers from a broker restart
    later (failing over to the next node, given a list).
    """
    urls = split_amqp_urls(url)
    reasons: list[str] = []
    for index, candidate in enumerate(urls):
        try:
            connection = await aio_pika.connect_robust(candidate, timeout=connect_timeout)
        except (TimeoutError, AMQPError, OSError) as exc:
            why = _why(exc, connect_timeout)
            reasons.append(f"cannot connect to the broker at {redacted(candidate)}: {why}")
            continue
        if len(urls) > 1:
            connection.close_callbacks.add(_Failover(urls, index))
        return connection
    raise BrokerUnreachable("; ".join(reasons))


class ExchangePublisher:
    """Publishes raw bodies on one existing exchange and waits for the broker's confirms.

    It declares nothing (the services own the topology), so a publish-only user (write on
    ``bangui``, no configure, no read) can use it. Publishes are mandatory: a message that no
    queue would take raises instead of vanishing.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        confirm_timeout: float,
    ) -> None:
        self.connection = connection
        self._channel = channel
        self._exchange = exchange
        self._timeout = confirm_timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        connect_timeout: float,
        confirm_timeout: float,
        exchange: str = topology.EXCHANGE,
    ) -> ExchangePublisher:
        connection = await connect_once(url, connect_timeout=connect_timeout)
        try:
            channel = await open_channel(connection)
            try:
                target = await channel.get_exchange(exchange, ensure=True)  # passive: no rights
            except ChannelNotFoundEntity:
                raise BrokerUnreachable(
                    f"exchange {exchange!r} does not exist on {redacted(url)} "
                    "(start a bangui-geo service once: it declares the topology)"
                ) from None
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, target, confirm_timeout)

    async def publish(
        self, routing_key: str, bodies: Sequence[bytes], *, window: int = 100
    ) -> None:
        """Publish ``bodies`` persistently, ``window`` confirms in flight at a time."""
        for start in range(0, len(bodies), window):
            try:
                await asyncio.gather(
                    *(
                        self._exchange.publish(
                            _message(body, expiration=None, headers=None),
                            routing_key,
                            mandatory=True,
                            timeout=self._timeout,
                        )
                        for body in bodies[start : start + window]
                    )
                )
            except PublishError:
                raise PublishFailed(
                    f"{routing_key} was not routed: no queue is bound to it on "
                    f"{self._exchange.name!r} (has the resolver declared its queue?)"
                ) from None
            except TimeoutError:
                raise PublishFailed(
                    f"{routing_key} not confirmed within {self._timeout:g} s"
                ) from None
            except (AMQPError, ChannelInvalidStateError, RuntimeError) as exc:
                raise PublishFailed(f"{routing_key} not confirmed: {exc!r}") from None

    async def close(self) -> None:
        await _close_quietly(self._channel)
        await self.connection.close()


@dataclass(frozen=True)
class DeadLetter:
    """A message in ``geo.dead_letter``: why it is there and where a replay would send it."""

    body: bytes
    routing_key: str  # as it reached geo.dead_letter
    replay_key: str | None  # the routing key it had on ``bangui``, if known
    reason: str
    rejected_by: str | None
    original_queue: str | None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def dead_letter_from(body: bytes, routing_key: str, headers: Mapping[str, object]) -> DeadLetter:
    """Read our ``x-geo-*`` headers, or the broker's ``x-death`` for its own dead-lettering."""
    death: Mapping[str, object] = {}
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        death = deaths[0]  # the most recent death comes first
    death_keys = death.get("routing-keys")
    death_key = _text(death_keys[0]) if isinstance(death_keys, list) and death_keys else None
    reason = _text(headers.get(topology.REASON_HEADER))
    if reason is None:
        broker_reason = _text(death.get("reason"))
        reason = f"dead-lettered by the broker: {broker_reason}" if broker_reason else "unknown"
    return DeadLetter(
        body=body,
        routing_key=routing_key,
        replay_key=_text(headers.get(topology.ROUTING_KEY_HEADER))
        or death_key
        or (routing_key or None),
        reason=reason,
        rejected_by=_text(headers.get(topology.SERVICE_HEADER)),
        original_queue=_text(headers.get(topology.QUEUE_HEADER)) or _text(death.get("queue")),
    )


def _letter(message: AbstractIncomingMessage) -> DeadLetter:
    return dead_letter_from(message.body, message.routing_key or "", dict(message.headers))


async def _dead_letter_queue(channel: AbstractChannel) -> tuple[AbstractQueue, int]:
    try:
        queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
    except ChannelNotFoundEntity:
        raise BrokerError(
            f"queue {topology.DEAD_LETTER_QUEUE!r} does not exist "
            "(start a bangui-geo service once: it declares the topology)"
        ) from None
    return queue, int(queue.declaration_result.message_count or 0)


async def peek_dead_letters(
    connection: AbstractRobustConnection, *, limit: int
) -> tuple[int, list[DeadLetter]]:
    """The number of dead letters and the first ``limit`` of them, all left in the queue.

    Each is taken unacked, so the next get returns the next one, and all are requeued at the
    end (a requeue keeps their places). Their ``redelivered`` flag is set by this.
    """
    channel = await connection.channel()
    try:
        queue, total = await _dead_letter_queue(channel)
        taken: list[AbstractIncomingMessage] = []
        try:
            for _ in range(min(total, limit)):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
        finally:
            if taken:
                with suppress(AMQPError, ChannelInvalidStateError, RuntimeError):
                    await taken[-1].nack(multiple=True, requeue=True)
        return total, [_letter(m) for m in taken]
    except (AMQPError, ChannelInvalidStateError) as exc:  # e.g. ACCESS_REFUSED: no read right
        raise BrokerError(f"cannot read {topology.DEAD_LETTER_QUEUE}: {exc}") from None
    finally:
        await _close_quietly(channel)


@dataclass(frozen=True)
class ReplayOutcome:
    letter: DeadLetter
    replayed: bool
    note: str  # what happened, e.g. "replayed to ip.seen" or why it was kept


async def replay_dead_letters(
    connection: AbstractRobustConnection,
    *,
    confirm_timeout: float,
    limit: int,
    dry_run: bool = False,
) -> list[ReplayOutcome]:
    """Republish dead letters to ``bangui`` with their original routing keys, each acked only
    after its republish is confirmed; those that cannot go back stay in the queue.

    At most the number of messages present at the start are taken, so a message that fails
    again and returns to the queue during the replay is not replayed twice.
    """
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        queue, total = await _dead_letter_queue(channel)
        exchange = await channel.get_exchange(topology.EXCHANGE, ensure=True)
        outcomes: list[ReplayOutcome] = []
        kept: list[AbstractIncomingMessage] = []  # requeued at the end, in their places
        for _ in range(min(total, limit)):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _letter(message)
            if letter.replay_key is None:
                kept.append(message)
                outcomes.append(ReplayOutcome(letter, False, "kept: no original routing key"))
                continue
            if dry_run:
                kept.append(message)
                note = f"would replay to {letter.replay_key}"
                outcomes.append(ReplayOutcome(letter, False, note))
                continue
            try:
                await exchange.publish(
                    _message(message.body, expiration=None, headers=None),
                    letter.replay_key,
                    mandatory=True,
                    timeout=confirm_timeout,
                )
            except PublishError:
                kept.append(message)
                note = f"kept: no queue is bound to {letter.replay_key}"
                outcomes.append(ReplayOutcome(letter, False, note))
                continue
            except DeliveryError:
                kept.append(message)
                outcomes.append(ReplayOutcome(letter, False, "kept: the broker refused it"))
                continue
            except (TimeoutError, AMQPError, ChannelInvalidStateError, RuntimeError) as exc:
                why = (
                    f"no answer within {confirm_timeout:g} s"
                    if isinstance(exc, TimeoutError)
                    else repr(exc)
                )
                raise PublishFailed(
                    f"replay to {letter.replay_key} not confirmed ({why}) after "
                    f"{sum(o.replayed for o in outcomes)} replayed; the rest stay queued"
                ) from None
            await message.ack()
            outcomes.append(ReplayOutcome(letter, True, f"replayed to {letter.replay_key}"))
        for message in kept:
            await message.nack(requeue=True)
        return outcomes
    except (AMQPError, ChannelInvalidStateError) as exc:  # e.g. ACCESS_REFUSED: no read right
        raise BrokerError(f"cannot replay {topology.DEAD_LETTER_QUEUE}: {exc}") from None
    finally:
        await _close_quietly(channel)  # anything still unacked goes back to the queue
