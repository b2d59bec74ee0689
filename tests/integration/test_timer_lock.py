"""The leader lock checked once a second for days must not hold on to anything per check: each
attempt is counted against the real connection's closing callbacks, its open channels, and the
memory Python allocated, as a standby (another timer holds the lock) and as the leader."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from shared import topology
from shared.amqp import Amqp, amqp_config
from shared.settings import Settings

pytestmark = pytest.mark.integration

WARM_UP = 30
ATTEMPTS = 300
# What a kept callback and its channel cost was ~4 kB per attempt; a flat lock stays far below.
MAX_BYTES_PER_ATTEMPT = 500


@pytest.fixture
async def two_timers(amqp_url: str) -> AsyncIterator[tuple[Amqp, Amqp]]:
    settings = Settings(amqp_url=amqp_url)
    leader = await Amqp.open(amqp_config(settings), service="timer", stop=asyncio.Event())
    standby = await Amqp.open(amqp_config(settings), service="timer", stop=asyncio.Event())
    try:
        yield leader, standby
    finally:
        await standby.close()
        await leader.close()


def held(amqp: Amqp) -> tuple[int, int]:
    """Callbacks on the aiormq connection's own closing future, and its open channels."""
    transport = amqp.connection.transport
    assert transport is not None
    raw = transport.connection
    closing: asyncio.Future[object] = raw._closing  # type: ignore[attr-defined]
    callbacks = closing._callbacks or ()  # type: ignore[attr-defined]
    return len(callbacks), len(raw.channels)


async def attempts(amqp: Amqp, count: int) -> set[bool]:
    return {await amqp.try_lead(topology.TIMER_LEADER_QUEUE) for _ in range(count)}


async def measure(amqp: Amqp) -> tuple[set[bool], tuple[int, int], tuple[int, int], int]:
    """Answers seen, what is held before and after ``ATTEMPTS`` attempts, bytes grown."""
    await attempts(amqp, WARM_UP)
    gc.collect()
    before = held(amqp)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        answers = await attempts(amqp, ATTEMPTS)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    return answers, before, held(amqp), grown


async def test_a_standby_polling_the_lock_holds_nothing_per_attempt(
    two_timers: tuple[Amqp, Amqp],
) -> None:
    leader, standby = two_timers
    assert await leader.try_lead(topology.TIMER_LEADER_QUEUE) is True
    answers, before, after, grown = await measure(standby)
    assert answers == {False}, "another timer holds the lock all along"
    assert after == before, f"closing callbacks, channels: {before} -> {after}"
    assert grown < MAX_BYTES_PER_ATTEMPT * ATTEMPTS, f"{grown} bytes kept by {ATTEMPTS} attempts"


async def test_the_leader_checking_its_lock_holds_nothing_per_check(
    two_timers: tuple[Amqp, Amqp],
) -> None:
    leader, standby = two_timers
    answers, before, after, grown = await measure(leader)
    assert answers == {True}
    assert after == before, f"closing callbacks, channels: {before} -> {after}"
    assert grown < MAX_BYTES_PER_ATTEMPT * ATTEMPTS, f"{grown} bytes kept by {ATTEMPTS} checks"
    assert await standby.try_lead(topology.TIMER_LEADER_QUEUE) is False


async def test_the_lock_is_taken_over_once_its_holder_is_gone(
    two_timers: tuple[Amqp, Amqp],
) -> None:
    """The kept channel changes nothing about the lock itself: it dies with its connection."""
    leader, standby = two_timers
    assert await leader.try_lead(topology.TIMER_LEADER_QUEUE) is True
    assert await standby.try_lead(topology.TIMER_LEADER_QUEUE) is False
    await leader.close()
    assert await standby.try_lead(topology.TIMER_LEADER_QUEUE) is True
    assert await standby.try_lead(topology.TIMER_LEADER_QUEUE) is True
