"""The timer's leadership loops without a broker: wait for the lock, keep checking it while
leading (at once after a reconnect), step down when another timer holds it, and ride out checks
that cannot reach the broker. The real lock (an exclusive queue) is exercised in
tests/integration/test_timer.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
import structlog
from structlog.testing import capture_logs

from services.timer import leadership
from services.timer.leadership import hold_lead, wait_to_lead

LOG = structlog.get_logger()


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


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leadership, "STANDBY_POLL", 0.001)


@pytest.mark.usefixtures("fast_poll")
async def test_a_standby_waits_until_the_lock_is_free_and_says_so_once() -> None:
    lock = FakeLock([False, RuntimeError("Connection was not opened"), False, True])
    with capture_logs() as logs:
        assert await wait_to_lead(lock, asyncio.Event(), LOG) is True
    assert lock.calls == 4
    assert [e["event"] for e in logs] == ["timer_standby_waiting", "timer_lead_check_failed"]


async def test_a_stopped_standby_stops_waiting() -> None:
    stop = asyncio.Event()
    stop.set()
    assert await wait_to_lead(FakeLock([]), stop, LOG) is False


@pytest.mark.usefixtures("fast_poll")
async def test_the_leader_steps_down_only_when_another_holds_the_lock() -> None:
    lock = FakeLock([True, ConnectionError("reconnecting"), True, False])
    with capture_logs() as logs:
        assert await hold_lead(lock, asyncio.Event(), asyncio.Event(), LOG) is True
    assert lock.calls == 4  # an unreachable broker was not taken for a lost lock
    assert [e["event"] for e in logs] == ["timer_lead_check_failed"]


async def test_a_reconnect_makes_the_leader_check_at_once() -> None:
    """STANDBY_POLL stays at its 1 s: only the reconnect can make the check this quick."""
    lock = FakeLock([False])
    reconnected = asyncio.Event()
    holding = asyncio.create_task(hold_lead(lock, asyncio.Event(), reconnected, LOG))
    await asyncio.sleep(0)
    reconnected.set()
    assert await asyncio.wait_for(holding, timeout=0.5) is True
    assert lock.calls == 1


@pytest.mark.usefixtures("fast_poll")
async def test_a_stopped_leader_is_not_a_lost_one() -> None:
    stop = asyncio.Event()

    class StopsOnThirdCheck(FakeLock):
        async def try_lead(self, lock_name: str) -> bool:
            if self.calls == 2:
                stop.set()  # a shutdown arriving while leading
            return await super().try_lead(lock_name)

    lock = StopsOnThirdCheck([True] * 10)
    assert await hold_lead(lock, stop, asyncio.Event(), LOG) is False
    assert lock.calls == 3
