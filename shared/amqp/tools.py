"""For the CLI and other BanGUI components: publishing without declaring anything, and the
dead-letter queue looked at and replayed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)

from shared import topology
from shared.amqp.connection import (
    BrokerError,
    BrokerUnreachable,
    PublishFailed,
    close_quietly,
    connect_once,
    json_message,
    open_channel,
    redacted,
)
from shared.deadletters import DeadLetter, dead_letter_from

log = structlog.get_logger("shared.amqp")


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
                            json_message(body, expiration=None, headers=None),
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
        await close_quietly(self._channel)
        await self.connection.close()


def _letter(message: AbstractIncomingMessage) -> DeadLetter:
    return dead_letter_from(
        message.body, message.routing_key or "", dict(message.headers), message.timestamp
    )


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
        await close_quietly(channel)


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
) -> tuple[int, list[ReplayOutcome]]:
    """Republish dead letters to ``bangui`` on their trusted routes (``shared.deadletters``),
    bare of headers, each acked only after its republish is confirmed; those that may not or
    cannot go back stay in the queue, with the reason in their outcome. Returns the number of
    dead letters there were at the start, and the outcomes.

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
            if letter.refusal is not None or letter.replay_key is None:
                kept.append(message)
                note = letter.refusal or "kept: no route back"
                outcomes.append(ReplayOutcome(letter, False, note))
                continue
            if dry_run:
                kept.append(message)
                note = f"would replay to {letter.replay_key}"
                outcomes.append(ReplayOutcome(letter, False, note))
                continue
            try:
                await exchange.publish(
                    json_message(message.body, expiration=None, headers=None),
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
        return total, outcomes
    except (AMQPError, ChannelInvalidStateError) as exc:  # e.g. ACCESS_REFUSED: no read right
        raise BrokerError(f"cannot replay {topology.DEAD_LETTER_QUEUE}: {exc}") from None
    finally:
        await close_quietly(channel)  # anything still unacked goes back to the queue


@dataclass(frozen=True)
class PurgeReport:
    total: int  # dead letters at the start
    purged: int
    examined: int


async def purge_dead_letters(
    connection: AbstractRobustConnection,
    *,
    select: Callable[[DeadLetter], bool],
    limit: int,
) -> PurgeReport:
    """Remove the dead letters ``select`` picks (acked: gone), among at most ``limit`` of those
    present at the start; the others are requeued in their places."""
    channel = await connection.channel()
    try:
        queue, total = await _dead_letter_queue(channel)
        kept: list[AbstractIncomingMessage] = []
        purged = examined = 0
        for _ in range(min(total, limit)):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            examined += 1
            if select(_letter(message)):
                await message.ack()
                purged += 1
            else:
                kept.append(message)
        for message in kept:
            await message.nack(requeue=True)
        return PurgeReport(total, purged, examined)
    except (AMQPError, ChannelInvalidStateError) as exc:  # e.g. ACCESS_REFUSED: no read right
        raise BrokerError(f"cannot purge {topology.DEAD_LETTER_QUEUE}: {exc}") from None
    finally:
        await close_quietly(channel)  # anything still unacked goes back to the queue
