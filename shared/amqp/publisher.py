"""Publishing on ``bangui`` with publisher confirms: the one confirmed publish every sender uses,
a service's publisher (``AmqpPublisher``, with its dead-letter channel; it and the in-memory
broker's publisher share ``ServicePublisher``) and the publish-only client of the CLI and other
components (``ExchangePublisher``, which declares nothing).

The senders differ only in what a failure means to their caller: ``Transient`` (requeue) in a
service, ``PublishFailed`` (one line, exit) in a tool.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    PublishError,
)
from pydantic import BaseModel

from shared import topology
from shared.amqp.connection import (
    BrokerUnreachable,
    PublishFailed,
    close_quietly,
    connect_once,
    json_message,
    open_channel,
    redacted,
)
from shared.deadletters import dead_letter_headers
from shared.errors import Transient


async def publish_confirmed(
    exchange: AbstractExchange,
    routing_key: str,
    bodies: Sequence[bytes],
    *,
    confirm_timeout: float,
    mandatory: bool = True,
    expiration: float | None = None,
) -> None:
    """Publish ``bodies`` persistently and wait for every confirm, all in flight together.

    Raises what aio-pika raises: ``TimeoutError`` (no confirm within ``confirm_timeout``),
    ``PublishError`` (``mandatory`` and no queue is bound; a ``DeliveryError`` when the broker
    refused it), ``AMQPError`` or ``ChannelInvalidStateError`` (the channel or connection went).
    """
    await asyncio.gather(
        *(
            exchange.publish(
                json_message(body, expiration=expiration, headers=None),
                routing_key,
                mandatory=mandatory,
                timeout=confirm_timeout,
            )
            for body in bodies
        )
    )


class DeadLetterChannel:
    """Publishes dead letters one at a time on a plain channel opened when needed.

    A refused dead letter (a topic permission, a missing exchange) closes its channel: the next
    one opens a fresh channel. A robust channel would instead reopen itself under the publishes
    still in flight, and the broker closes the whole connection on that.
    """

    def __init__(self, connection: AbstractRobustConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def publish(self, body: bytes, *, route: str, headers: dict[str, Any]) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            headers=headers,
            timestamp=datetime.now(UTC),  # when it was dead-lettered: purge --older-than
        )
        async with self._lock:
            channel = await self._open()
            try:
                await channel.basic_publish(
                    body,
                    exchange=topology.DEAD_LETTER_EXCHANGE,
                    routing_key=route,
                    mandatory=True,  # an unbound geo.dead_letter is a failure, not a silent drop
                    properties=properties,
                    timeout=self._timeout,
                )
            except BaseException:
                self._channel = None
                if not channel.is_closed:
                    with suppress(Exception):
                        await channel.close()
                raise

    async def _open(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            transport = self._connection.transport
            if transport is None:
                raise ConnectionError("not connected to the broker")
            self._channel = await asyncio.wait_for(
                transport.connection.channel(publisher_confirms=True), self._timeout
            )
        return self._channel

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with suppress(Exception):
                await channel.close()


class ServicePublisher(ABC):
    """A service's ``Publisher`` and dead-letterer, on the broker or on the in-memory one: models
    are serialized and dead-letter copies get their headers here, the same for both; how bodies
    and dead letters reach an exchange is each subclass's own."""

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

    @abstractmethod
    async def publish_bodies(
        self,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None: ...

    async def dead_letter(
        self,
        message: AbstractIncomingMessage,
        *,
        route: str,
        reason: str,
        service: str,
        queue: str,
        body: bytes | None = None,
    ) -> None:
        """Publish a copy of ``message`` (or ``body``, the part of it that was rejected) to
        ``bangui.dlx`` under ``route``, what ``queue`` is for (never the delivery's routing key,
        which a CC/BCC header may have carried there)."""
        headers = dead_letter_headers(
            message.headers,
            reason=reason,
            service=service,
            queue=queue,
            delivered_as=message.routing_key or "",
        )
        copy = message.body if body is None else body
        await self.publish_dead_letter(copy, route=route, headers=headers)

    @abstractmethod
    async def publish_dead_letter(
        self, body: bytes, *, route: str, headers: dict[str, Any]
    ) -> None:
        """Publish ``body`` to ``bangui.dlx`` under ``route``, mandatory, with ``headers``."""


class AmqpPublisher(ServicePublisher):
    """Publishes on ``bangui`` with confirms; a group of publishes is confirmed together."""

    def __init__(
        self, exchange: AbstractExchange, dead_letters: DeadLetterChannel, timeout: float
    ) -> None:
        self._exchange = exchange
        self._dead_letters = dead_letters
        self._timeout = timeout

    @property
    def timeout(self) -> float:
        return self._timeout

    @classmethod
    async def create(
        cls,
        channel: AbstractChannel,
        connection: AbstractRobustConnection,
        confirm_timeout: float,
    ) -> AmqpPublisher:
        # Not declared (the keeper checks it): a restore after a lost channel or connection
        # must not fail on an exchange that is gone for a moment.
        exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
        return cls(exchange, DeadLetterChannel(connection, confirm_timeout), confirm_timeout)

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
            await publish_confirmed(
                self._exchange,
                routing_key,
                bodies,
                confirm_timeout=self._timeout,
                mandatory=mandatory,
                expiration=expiration,
            )
        except (TimeoutError, AMQPConnectionError, ChannelInvalidStateError) as exc:
            raise Transient(f"publish to {routing_key} not confirmed: {exc!r}") from exc

    async def publish_dead_letter(
        self, body: bytes, *, route: str, headers: dict[str, Any]
    ) -> None:
        await self._dead_letters.publish(body, route=route, headers=headers)

    async def close(self) -> None:
        await self._dead_letters.close()


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
                await publish_confirmed(
                    self._exchange,
                    routing_key,
                    bodies[start : start + window],
                    confirm_timeout=self._timeout,
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
        await close_quietly(self._channel)
        await self.connection.close()
