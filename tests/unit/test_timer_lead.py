"""The timer's leadership loops without a broker: wait for the lock, keep checking it while
leading, step down when another timer holds it, and ride out checks that cannot reach the broker.
The real lock (an exclusive queue) is exercised in tests/integration/test_timer.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import pytest
import structlog
from structlog.testing import capture_logs

from services.timer import bootstrap
from services.timer.bootstrap import _hold_lead, _wait_to_lead
from shared.amqp import Amqp


class FakeLock:
    """Answers ``try_lead`` from a script: True (held), False (another holds it) or an error."""

    def __init__(self, answers: Iterable[bool | Exception]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def try_lead(self, lock_name: str) -> bool:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "STANDBY_POLL", 0.001)


def run(lock: FakeLock, loop: Any, stop: asyncio.Event | None = None) -> tuple[Any, list[Any]]:
    async def go() -> Any:
        return await loop(cast(Amqp, lock), stop or asyncio.Event(), structlog.get_logger())

    with capture_logs() as logs:
        result = asyncio.run(go())
    return result, logs


def test_a_standby_waits_until_the_lock_is_free_and_says_so_once() -> None:
    lock = FakeLock([False, RuntimeError("Connection was not opened"), False, True])
    leading, logs = run(lock, _wait_to_lead)
    assert leading is True
    assert lock.calls == 4
    assert [e["event"] for e in logs] == ["timer_standby_waiting", "timer_lead_check_failed"]


def test_a_stopped_standby_stops_waiting() -> None:
    stop = asyncio.Event()
    stop.set()
    leading, _ = run(FakeLock([]), _wait_to_lead, stop)
    assert leading is False


def test_the_leader_steps_down_only_when_another_holds_the_lock() -> None:
    lock = FakeLock([True, ConnectionError("reconnecting"), True, False])
    lost, logs = run(lock, _hold_lead)
    assert lost is True
    assert lock.calls == 4  # an unreachable broker was not taken for a lost lock
    assert [e["event"] for e in logs] == ["timer_lead_check_failed"]


def test_a_stopped_leader_is_not_a_lost_one() -> None:
    stop = asyncio.Event()

    class StopsAfterThree(FakeLock):
        async def try_lead(self, lock_name: str) -> bool:
            if self.calls == 2:
                stop.set()  # a shutdown arriving while leading
            return await super().try_lead(lock_name)

    lock = StopsAfterThree([True] * 10)
    lost, _ = run(lock, _hold_lead, stop)
    assert lost is False
    assert lock.calls == 3
