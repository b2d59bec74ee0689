"""The timer's fixed cadence: the pure tick arithmetic, and the publishing loop driven by a
scripted monotonic clock (so no test waits for a real interval)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from services.timer.cadence import next_tick, skipped
from services.timer.tally import TickSummary, TickTally
from services.timer.ticker import Cadence, tick_forever
from shared import topology
from shared.messages import FlushDirty
from tests.fakes import FakePublisher


def test_first_tick_is_one_full_interval_after_start() -> None:
    assert next_tick(100.0, 10.0, 100.0) == (1, 110.0)


def test_a_clock_before_start_still_gives_tick_one() -> None:
    assert next_tick(100.0, 10.0, 40.0) == (1, 110.0)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 1000])
def test_tick_k_is_due_at_start_plus_k_intervals(k: int) -> None:
    start, interval = 1000.0, 2.5
    now = start + (k - 1) * interval + interval / 2  # mid-way to tick k, tick k-1 fired
    assert next_tick(start, interval, now, after=k - 1) == (k, start + k * interval)


def test_missed_ticks_are_skipped_not_bunched() -> None:
    k, due = next_tick(0.0, 10.0, 35.0, after=1)  # ticks 2 and 3 passed while busy
    assert (k, due) == (4, 40.0)
    assert skipped(1, k) == 2


def test_skipped_counts_only_the_gap() -> None:
    assert skipped(1, 2) == 0
    assert skipped(0, 1) == 0
    assert skipped(2, 7) == 4
    assert skipped(5, 5) == 0


def test_after_guards_against_a_due_time_that_rounds_below_its_tick() -> None:
    # 43 * 0.1 lands a hair under the 43rd multiple: floor() says tick 42 just passed.
    start, interval, k = 0.0, 0.1, 43
    due = start + k * interval
    assert math.floor((due - start) / interval) == k - 1
    assert next_tick(start, interval, due)[0] == k  # without the guard: tick 43 again
    assert next_tick(start, interval, due, after=k) == (k + 1, start + (k + 1) * interval)


def test_waking_a_little_early_does_not_fire_the_same_tick_twice() -> None:
    assert next_tick(0.0, 10.0, 19.999999, after=2) == (3, 30.0)


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_non_positive_interval_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        next_tick(0.0, interval, 1.0)


@given(
    start=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    interval=st.floats(min_value=1e-3, max_value=1e5, allow_nan=False),
    elapsed=st.floats(min_value=-1e3, max_value=1e7, allow_nan=False),
    after=st.integers(min_value=0, max_value=10**6),
)
def test_next_tick_properties(start: float, interval: float, elapsed: float, after: int) -> None:
    now = start + elapsed
    k, due = next_tick(start, interval, now, after=after)
    assert k >= 1
    assert k > after
    assert due == start + k * interval
    # No future tick is jumped over: the one before k was either already fired or already due.
    assert k - 1 == after or (k - 1) * interval <= (now - start) * (1 + 1e-9) + 1e-9


@dataclass
class ScriptedClock:
    """A monotonic clock that returns the given readings in order, and fails when it runs out."""

    readings: list[float]
    calls: int = 0

    def __call__(self) -> float:
        assert self.calls < len(self.readings), "ticker read the clock more often than expected"
        self.calls += 1
        return self.readings[self.calls - 1]


@dataclass
class StoppingPublisher(FakePublisher):
    """Sets ``stop`` once ``limit`` publishes went through; ``failures`` raise first."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    limit: int = 1
    failures: list[BaseException] = field(default_factory=list)

    async def publish(
        self, routing_key: str, messages: Sequence[BaseModel], *, expiration: float | None = None
    ) -> None:
        if self.failures:
            raise self.failures.pop(0)
        await super().publish(routing_key, messages, expiration=expiration)
        if len(self.published) >= self.limit:
            self.stop.set()


def flush_cadence(interval: float) -> Cadence:
    def command(tick_id: str, issued_at: datetime) -> FlushDirty:
        return FlushDirty(tick_id=tick_id, issued_at=issued_at)

    return Cadence("flush", topology.FLUSH, interval, command)


def tick_ids(publisher: FakePublisher) -> list[str]:
    return [m.tick_id for m in publisher.on(topology.FLUSH) if isinstance(m, FlushDirty)]


async def test_ticker_publishes_due_ticks_skips_missed_ones_and_ids_them_by_due_time() -> None:
    publisher = StoppingPublisher(limit=4)
    # start; then per loop: "now" for next_tick, then "now" for the wait (due reached: no wait).
    clock = ScriptedClock(
        [
            0.0,
            *(0.0, 10.0),  # tick 1
            *(35.0, 40.0),  # busy until 35: ticks 2 and 3 skipped, tick 4 fires
            *(40.0, 49.9999999),  # tick 5, the wait returns a hair early
            *(49.9999999, 60.0),  # the early wake-up must not fire tick 5 again: tick 6
        ]
    )
    published = await tick_forever(
        flush_cadence(10.0), publisher, publisher.stop, monotonic=clock, wall=lambda: 1000.0
    )
    assert published == 4
    assert clock.calls == len(clock.readings)
    assert tick_ids(publisher) == [
        "flush:1010.000",
        "flush:1040.000",
        "flush:1050.000",
        "flush:1060.000",
    ]
    assert {key for key, _, _ in publisher.published} == {topology.FLUSH}
    assert {expiration for _, _, expiration in publisher.published} == {10.0}


async def test_ticker_keeps_its_cadence_when_a_publish_fails() -> None:
    publisher = StoppingPublisher(limit=1, failures=[ConnectionError("broker gone")])
    clock = ScriptedClock([0.0, 0.0, 10.0, 10.0, 20.0])
    published = await tick_forever(
        flush_cadence(10.0), publisher, publisher.stop, monotonic=clock, wall=lambda: 500.0
    )
    assert published == 1
    assert tick_ids(publisher) == ["flush:520.000"]  # tick 1 lost, tick 2 on time


async def test_ticker_with_the_real_clock_publishes_increasing_ticks() -> None:
    interval = 0.05
    publisher = StoppingPublisher(limit=3)
    published = await asyncio.wait_for(
        tick_forever(flush_cadence(interval), publisher, publisher.stop, wall=lambda: 0.0),
        timeout=5,
    )
    assert published == 3
    dues = [float(tick_id.removeprefix("flush:")) for tick_id in tick_ids(publisher)]
    ticks = [round(due / interval) for due in dues]
    assert ticks[0] >= 1
    assert ticks == sorted(set(ticks))  # strictly increasing: no tick fired twice
    assert all(math.isclose(due, k * interval) for due, k in zip(dues, ticks, strict=True))


async def test_ticker_stops_while_waiting_without_publishing() -> None:
    publisher = StoppingPublisher()
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, stop.set)
    published = await asyncio.wait_for(tick_forever(flush_cadence(3600.0), publisher, stop), 5)
    assert published == 0
    assert publisher.published == []


async def test_ticker_returns_at_once_when_already_stopped() -> None:
    publisher = StoppingPublisher()
    stop = asyncio.Event()
    stop.set()
    clock = ScriptedClock([0.0])
    assert await tick_forever(flush_cadence(1.0), publisher, stop, monotonic=clock) == 0
    assert publisher.published == []


def test_tick_tally_summarizes_the_first_tick_then_once_a_window() -> None:
    tally = TickTally(every=60.0)
    first = tally.record(ok=True, tick_id="flush:0", now=100.0)
    assert first == TickSummary(published=1, failed=0, window_s=0.0, last_tick_id="flush:0")
    quiet = [
        tally.record(ok=i % 10 != 0, tick_id=f"flush:{i}", now=100.0 + i) for i in range(1, 60)
    ]
    assert quiet == [None] * 59
    due = tally.record(ok=True, tick_id="flush:60", now=160.0)
    assert due == TickSummary(published=55, failed=5, window_s=60.0, last_tick_id="flush:60")
    assert tally.record(ok=False, tick_id="flush:61", now=161.0) is None
    late = tally.record(ok=True, tick_id="flush:62", now=400.0)  # a long gap: one line, counts
    assert late == TickSummary(published=1, failed=1, window_s=240.0, last_tick_id="flush:62")
