"""Every branch of the delivery policy, as a pure function: what becomes of a delivery for each
way its handling can end, first delivery and redelivery."""

from __future__ import annotations

import pytest

from shared.disposition import (
    MAX_REASON,
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


@pytest.mark.parametrize("redelivered", [False, True])
@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Handled(), Ack()),
        (Held(), Leave()),  # the ticket's holder acks later
        (Unanswered(), Ack()),  # a request whose handler failed: the requester falls back
        (Refused("not valid JSON"), DeadLetter("not valid JSON")),
        (TransientFailure("database is locked"), Requeue(backoff_s=TRANSIENT_BACKOFF)),
        (DeadLettered(), Ack()),
        (DeadLetterFailed("not valid JSON"), RejectWithoutRequeue()),
    ],
)
def test_the_same_on_a_first_delivery_and_a_redelivery(
    outcome: Outcome, expected: Disposition, redelivered: bool
) -> None:
    assert disposition(outcome, redelivered=redelivered) == expected


def test_a_transient_failure_is_requeued_after_a_back_off_however_often() -> None:
    assert TRANSIENT_BACKOFF > 0
    assert disposition(TransientFailure("x"), redelivered=True) == Requeue(TRANSIENT_BACKOFF)


def test_a_handler_failing_once_is_requeued_at_once() -> None:
    assert disposition(Failed("RuntimeError('boom')"), redelivered=False) == Requeue(0.0)


def test_a_handler_failing_on_the_redelivery_is_dead_lettered_with_its_error() -> None:
    assert disposition(Failed("RuntimeError('boom')"), redelivered=True) == DeadLetter(
        "handler failed on redelivery: RuntimeError('boom')"
    )


def test_the_reason_of_a_failure_is_bounded() -> None:
    got = disposition(Failed("x" * 5000), redelivered=True)
    assert isinstance(got, DeadLetter)
    assert len(got.reason) == MAX_REASON
    assert got.reason.startswith("handler failed on redelivery: xxx")


def test_a_refusal_keeps_its_reason_whole() -> None:
    reason = "ips.3: not an IP address " * 10
    assert disposition(Refused(reason), redelivered=False) == DeadLetter(reason)
