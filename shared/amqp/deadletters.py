"""Administration of ``geo.dead_letter`` for the CLI: peek at the dead letters, replay them to
their trusted routes (``shared.deadletters``) and purge them; a dead letter is only ever removed
once its replay is confirmed or it was picked for purging."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from aio_pika.abc import (
    AbstractChannel,
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
from shared.amqp.connection import BrokerError, PublishFailed, close_quietly
from shared.amqp.publisher import publish_confirmed
from shared.deadletters import DeadLetter, dead_letter_from


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
                await publish_confirmed(
                    exchange, letter.replay_key, [message.body], confirm_timeout=confirm_timeout
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
