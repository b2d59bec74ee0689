"""What becomes of a delivery, decided from what its handling came to: the delivery policy as a
pure function, so every branch is unit-tested without a broker.

A handler that succeeds is acked; one that keeps a ticket leaves the delivery to it. A message
that can never succeed is dead-lettered with the reason, and rejected without requeue if that
dead letter cannot be published (the broker then dead-letters or drops it: a poison message
never stays unsettled). A transient failure is requeued after a back-off; any other failure is
requeued once and dead-lettered on its redelivery. A request whose handler fails is acked
unanswered: its requester falls back at its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSIENT_BACKOFF = 1.0  # seconds before a transient failure's message is requeued
MAX_REASON = 500  # characters of a handler's error kept as the dead letter's reason


@dataclass(frozen=True)
class Handled:
    """The handler returned (a request: its reply was published)."""


@dataclass(frozen=True)
class Held:
    """A deferred handler keeps the ticket and acks later."""


@dataclass(frozen=True)
class Unanswered:
    """A request's handler failed: nobody waits for a retry or a dead letter."""


@dataclass(frozen=True)
class Refused:
    """The message can never succeed (malformed, not bound here, a request without reply_to)."""

    reason: str


@dataclass(frozen=True)
class TransientFailure:
    """The world was not ready (a confirm timed out, the database was locked)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The handler raised something else."""

    error: str  # repr of the exception


@dataclass(frozen=True)
class DeadLettered:
    """The dead letter a ``DeadLetter`` asked for was published."""


@dataclass(frozen=True)
class DeadLetterFailed:
    """The dead letter a ``DeadLetter`` asked for could not be published."""

    reason: str


Outcome = (
    Handled
    | Held
    | Unanswered
    | Refused
    | TransientFailure
    | Failed
    | DeadLettered
    | DeadLetterFailed
)


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Leave:
    """Settle nothing now: the ticket's holder acks the delivery."""


@dataclass(frozen=True)
class Requeue:
    backoff_s: float = 0.0


@dataclass(frozen=True)
class DeadLetter:
    """Publish a copy to ``bangui.dlx`` with ``reason``, then settle by the outcome of that."""

    reason: str


@dataclass(frozen=True)
class RejectWithoutRequeue:
    pass


Disposition = Ack | Leave | Requeue | DeadLetter | RejectWithoutRequeue


def disposition(outcome: Outcome, *, redelivered: bool) -> Disposition:
    match outcome:
        case Handled() | Unanswered() | DeadLettered():
            return Ack()
        case Held():
            return Leave()
        case Refused(reason=reason):
            return DeadLetter(reason)
        case TransientFailure():
            return Requeue(backoff_s=TRANSIENT_BACKOFF)
        case Failed(error=error):
            if redelivered:
                return DeadLetter(f"handler failed on redelivery: {error}"[:MAX_REASON])
            return Requeue()
        case DeadLetterFailed():
            return RejectWithoutRequeue()
