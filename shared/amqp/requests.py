"""Request/reply over RabbitMQ's direct reply-to: a requester publishes on ``bangui`` with
``reply_to=amq.rabbitmq.reply-to`` and a ``correlation_id``, and waits (bounded) for the answer.

No reply queue to declare, bind or delete (so no configure permission is needed), and a requester
that is gone leaves nothing behind. The resolver asks persistence (``geo.known``) with it, and
``GeoClient`` asks the resolver (``geo.lookup``).
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import suppress

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPConnectionError, ChannelInvalidStateError

from shared import topology

log = structlog.get_logger("shared.amqp")


class Requester:
    """Sends requests and matches replies by ``correlation_id``; one channel, one consumer of
    ``amq.rabbitmq.reply-to`` (the broker requires both on the same channel)."""

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange) -> None:
        self._channel = channel
        self._exchange = exchange
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    @classmethod
    async def open(cls, connection: AbstractConnection) -> Requester:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
        requester = cls(channel, exchange)
        queue = await channel.get_queue(topology.DIRECT_REPLY_TO, ensure=False)
        requester._queue = queue
        requester._tag = await queue.consume(requester._on_reply, no_ack=True)
        return requester

    async def request(
        self, routing_key: str, body: bytes, wait: float, *, expire: bool = True
    ) -> bytes | None:
        """The reply's body, or None when none came within ``wait`` seconds (nobody
        answering is the caller's fallback case, never an error). With ``expire`` the request
        expires unread after the same time, so a backlog of stale questions cannot build up;
        without, it waits for an answerer however late (the reply then finds nobody waiting
        and is dropped): for a queue whose expired messages the broker would dead-letter into
        ``geo.dead_letter`` as if they were bad input."""
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=topology.DIRECT_REPLY_TO,
                    expiration=max(wait, 0.001) if expire else None,
                ),
                routing_key,
                mandatory=False,
            )
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            return None
        except (AMQPConnectionError, ChannelInvalidStateError, RuntimeError) as exc:
            log.warning("amqp_request_failed", routing_key=routing_key, error=repr(exc))
            return None
        finally:
            self._waiting.pop(correlation_id, None)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def close(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        if self._queue is not None and self._tag is not None:
            with suppress(Exception):
                await self._queue.cancel(self._tag)
        with suppress(Exception):
            await self._channel.close()


async def publish_reply(
    channel: AbstractChannel, request: AbstractIncomingMessage, body: bytes, confirm_timeout: float
) -> None:
    """Answer ``request`` on the default exchange at its ``reply_to``, with its correlation id.

    Not mandatory: a requester that is gone (its direct reply-to channel closed, its queue
    deleted) is not our error, and its answer is simply dropped.
    """
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=request.correlation_id,
        ),
        request.reply_to or "",
        mandatory=False,
        timeout=confirm_timeout,
    )
