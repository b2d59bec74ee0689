"""Making sure the topology a service relies on is there: at start, every ``TOPOLOGY_CHECK_S``
seconds and right after a reconnect.

Who may create it decides how: a user that may configure the exchanges and queues (guest in
development and tests) declares all of it, and re-binds every queue, as any service always did;
the deployment's users may not (the broker definitions own the topology), so the exchanges and
queues are declared passively and only this service's own queues are re-bound. What is missing
and may not be created stops the service with one line naming it and who must create it.

Each check runs on a plain (not robust) channel of its own: a refused or missing entity closes
that channel only, and nothing of it is replayed after a reconnect. ``declare_topology``
declares the same on an aio-pika channel in one go, for tests and the bench.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection, ExchangeType
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from shared import topology
from shared.errors import TopologyLost, TopologyMismatch

log = structlog.get_logger("shared.amqp")

TOPOLOGY_CHECK_S = 10.0
EXCHANGES = (topology.EXCHANGE, topology.DEAD_LETTER_EXCHANGE)
DURABLE_QUEUES = (*topology.WORK_QUEUES, topology.DEAD_LETTER)
OWNER = (
    "the broker definitions create it (deploy/rabbitmq/definitions.json, loaded at boot), or an "
    "administrator must"
)


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


Operation = Callable[[aiormq.abc.AbstractChannel], Awaitable[Any]]


@dataclass
class TopologyKeeper:
    """Declares or checks the topology; ``own`` are the bindings of this service's queues."""

    connection: AbstractRobustConnection
    user: str
    queue_type: topology.QueueType = "classic"
    own: list[Binding] = field(default_factory=list)
    may_configure: bool | None = None  # learned on the first declaration
    _channel: aiormq.abc.AbstractChannel | None = None

    async def ensure(self) -> None:
        """One full check; raises ``TopologyLost`` for what is missing and may not be created."""
        try:
            for name in EXCHANGES:
                active = _exchange(name, passive=False)
                await self._ensure("exchange", name, active, _exchange(name))
            bindings = self._bindings()
            for spec in DURABLE_QUEUES:
                active = _queue(spec.name, spec.declare_arguments(self.queue_type))
                await self._ensure("queue", spec.name, active, _queue(spec.name, None))
                # Bound at once, as a queue always was: a publisher that sees the queue exist
                # must not find it unbound (its message would be unroutable and dropped).
                for binding in [b for b in bindings if b.queue == spec.name]:
                    await self._bind(binding)
            declared = {spec.name for spec in DURABLE_QUEUES}
            for binding in [b for b in bindings if b.queue not in declared]:
                await self._bind(binding)
        finally:
            await self._close()

    async def ensure_bindings(self, bindings: Sequence[Binding]) -> None:
        """Bind these now (idempotent); a refusal raises ``TopologyLost``."""
        try:
            for binding in bindings:
                await self._bind(binding)
        finally:
            await self._close()

    def _bindings(self) -> list[Binding]:
        every = [] if not self.may_configure else _durable_bindings()
        return every + [b for b in self.own if b not in every]

    async def _ensure(self, kind: str, name: str, active: Operation, passive: Operation) -> None:
        """Passively first (needs no permission); then actively where it is missing, or to
        check its arguments while this user may configure it."""
        try:
            await self._run(passive)
        except ChannelNotFoundEntity:
            exists = False
        else:
            exists = True
            if self.may_configure is False:
                return
        try:
            await self._run(active)
        except ChannelAccessRefused:
            if self.may_configure is None:
                log.info("amqp_topology_checked_passively", user=self.user)
            self.may_configure = False
            if exists:
                return
            raise TopologyLost(
                f"{kind} {name!r} does not exist and user {self.user!r} may not create it: {OWNER}"
            ) from None
        except ChannelPreconditionFailed as exc:
            raise self._mismatch(kind, name, exc) from None
        self.may_configure = True
        if not exists:
            log.info("amqp_topology_created", kind=kind, name=name)

    def _mismatch(self, kind: str, name: str, exc: BaseException) -> TopologyMismatch:
        if kind != "queue":
            return TopologyMismatch(f"exchange {name} exists with another type or flags: {exc}")
        spec = next(s for s in DURABLE_QUEUES if s.name == name)
        return _queue_mismatch(spec, self.queue_type, exc)

    async def _bind(self, binding: Binding) -> None:
        async def bind(channel: aiormq.abc.AbstractChannel) -> None:
            await channel.queue_bind(
                binding.queue, binding.exchange, routing_key=binding.routing_key
            )

        try:
            await self._run(bind)
        except ChannelAccessRefused:
            raise TopologyLost(
                f"user {self.user!r} may not bind queue {binding.queue!r} to "
                f"{binding.routing_key!r} on {binding.exchange!r}: grant it in the broker "
                "definitions (deploy/rabbitmq/definitions.json)"
            ) from None
        except ChannelNotFoundEntity:  # an exclusive queue gone with its channel: restored anew
            log.info("amqp_binding_skipped", queue=binding.queue, key=binding.routing_key)

    async def _run(self, operation: Operation) -> None:
        if self._channel is None or self._channel.is_closed:
            transport = self.connection.transport
            if transport is None:
                raise ConnectionError("not connected to the broker")
            self._channel = await transport.connection.channel()
        try:
            await operation(self._channel)
        except AMQPError:
            self._channel = None  # the broker closed it
            raise

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except Exception as exc:  # best effort: the broker drops it with the connection
                log.debug("amqp_channel_close_failed", error=repr(exc))


def _queue_mismatch(
    spec: topology.QueueSpec, queue_type: topology.QueueType, exc: BaseException
) -> TopologyMismatch:
    arguments = spec.declare_arguments(queue_type)
    return TopologyMismatch(
        f"queue {spec.name} exists with other arguments than this version declares "
        f"({arguments or 'none'}): {exc.args[0] if exc.args else exc}; drain and delete "
        f"it (rabbitmqctl delete_queue -p <vhost> {spec.name}), then start again"
    )


async def declare_topology(
    channel: AbstractChannel, queue_type: topology.QueueType = "classic"
) -> dict[str, AbstractQueue]:
    """Declare exchanges, queues and bindings on an aio-pika channel, all at once, as a user
    that may configure them: for tests, the bench and tools that set a broker up (a service
    runs ``TopologyKeeper.ensure``, which also copes with users that may not)."""
    exchange = await channel.declare_exchange(topology.EXCHANGE, ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(
        topology.DEAD_LETTER_EXCHANGE, ExchangeType.TOPIC, durable=True
    )
    queues: dict[str, AbstractQueue] = {}
    for spec in DURABLE_QUEUES:
        source = dlx if spec is topology.DEAD_LETTER else exchange
        arguments = spec.declare_arguments(queue_type)
        try:
            queue = await channel.declare_queue(
                spec.name, durable=True, arguments=arguments or None
            )
        except ChannelPreconditionFailed as exc:
            raise _queue_mismatch(spec, queue_type, exc) from None
        for key in spec.routing_keys:
            await queue.bind(source, routing_key=key)
        queues[spec.name] = queue
    return queues


def _durable_bindings() -> list[Binding]:
    out = [
        Binding(spec.name, topology.EXCHANGE, key)
        for spec in topology.WORK_QUEUES
        for key in spec.routing_keys
    ]
    out += [
        Binding(topology.DEAD_LETTER.name, topology.DEAD_LETTER_EXCHANGE, key)
        for key in topology.DEAD_LETTER.routing_keys
    ]
    return out


def own_bindings(queue: str, routing_keys: Sequence[str]) -> list[Binding]:
    return [Binding(queue, topology.EXCHANGE, key) for key in routing_keys]


def _exchange(name: str, *, passive: bool = True) -> Operation:
    async def declare(channel: aiormq.abc.AbstractChannel) -> None:
        await channel.exchange_declare(name, exchange_type="topic", durable=True, passive=passive)

    return declare


def _queue(name: str, arguments: dict[str, Any] | None) -> Operation:
    """Declare ``name`` actively with ``arguments``, or passively when they are None."""

    async def declare(channel: aiormq.abc.AbstractChannel) -> None:
        if arguments is None:
            await channel.queue_declare(name, passive=True)
        else:
            await channel.queue_declare(name, durable=True, arguments=arguments or None)

    return declare


async def keep_topology(
    keeper: TopologyKeeper,
    wake: asyncio.Event,
    on_lost: Callable[[TopologyLost], None],
    interval: float = TOPOLOGY_CHECK_S,
) -> None:
    """Check every ``interval`` seconds, and at once when ``wake`` is set (after a reconnect).

    A check that cannot reach the broker changes nothing: the next one decides. What is lost for
    good is handed to ``on_lost`` (the service stops), and the loop ends.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=interval)
        wake.clear()
        try:
            await asyncio.wait_for(keeper.ensure(), timeout=interval)
        except (TopologyLost, TopologyMismatch) as exc:
            log.error("amqp_topology_lost", reason=str(exc))
            on_lost(TopologyLost(str(exc)))
            return
        except Exception as exc:  # reconnecting, or the broker is down: the next check decides
            log.info("amqp_topology_check_failed", error=repr(exc))
