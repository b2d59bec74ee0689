"""The timer's leadership loops: wait for the leader lock as a standby, keep checking it while
leading (at once after a reconnect), and step down when another timer holds it.

They need only ``try_lead`` (``Lock``), so they are tested with a plain fake; ``Amqp`` is the real
lock (an exclusive queue the broker drops with its holder's connection).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from shared import topology

STANDBY_POLL = 1.0
LEAD_CHECK_S = 2.0

Logger = structlog.typing.FilteringBoundLogger


class Lock(Protocol):
    async def try_lead(self, lock_name: str) -> bool:
        """Become, or check that we still are, the one holder of ``lock_name``."""
        ...


async def wait_to_lead(lock: Lock, stop: asyncio.Event, log: Logger) -> bool:
    """Poll the lock until we hold it (True) or are stopped (False)."""
    announced = False
    while not stop.is_set():
        if await lead_check(lock, log):
            return True
        if not announced:
            log.info("timer_standby_waiting", lock=topology.TIMER_LEADER_QUEUE)
            announced = True
        await first_set(stop, within=STANDBY_POLL)
    return False


async def hold_lead(
    lock: Lock, stop: asyncio.Event, reconnected: asyncio.Event, log: Logger
) -> bool:
    """Check the lock every poll, and at once after a reconnect, while leading: True once
    another timer holds it, False when stopped. A check that cannot reach the broker changes
    nothing: the next one decides."""
    while True:
        await first_set(stop, reconnected, within=STANDBY_POLL)
        if stop.is_set():
            return False
        reconnected.clear()
        if await lead_check(lock, log) is False:
            return True


async def lead_check(lock: Lock, log: Logger) -> bool | None:
    """Whether we hold the lock now; None when the broker could not be asked (bounded, so a
    shutdown waits at most ``LEAD_CHECK_S`` for a check in flight)."""
    try:
        return await asyncio.wait_for(lock.try_lead(topology.TIMER_LEADER_QUEUE), LEAD_CHECK_S)
    except Exception as exc:  # reconnecting, or the broker is down: ask again next poll
        log.info("timer_lead_check_failed", error=repr(exc))
        return None


async def first_set(*events: asyncio.Event, within: float) -> None:
    """Return when one of ``events`` is set or after ``within`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
