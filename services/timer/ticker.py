"""The timer's loops: publish ``geo.flush`` and ``geo.re_resolve`` on a fixed cadence.

Each command carries a tick id from its due (wall-clock) time, so consumers can drop duplicates,
and a message TTL of one interval, so a consumer that was down wakes to one fresh command, not a
pile of stale ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from pydantic import BaseModel

from services.timer.cadence import next_tick, skipped
from services.timer.tally import TickTally
from shared.ports import Publisher


@dataclass(frozen=True)
class Cadence:
    name: str
    routing_key: str
    interval: float
    command: Callable[[str, datetime], BaseModel]


async def tick_forever(
    cadence: Cadence,
    publisher: Publisher,
    stop: asyncio.Event,
    published_counts: Counter[str] | None = None,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    anchor: tuple[float, float] | None = None,
) -> int:
    """Publish ``cadence``'s command at each due tick until ``stop``; returns ticks published.
    ``anchor`` (monotonic, wall) is the start the ticks count from, shared by the cadences."""
    log = structlog.get_logger("timer")
    start_mono, start_wall = anchor if anchor is not None else (monotonic(), wall())
    last = 0
    published = 0
    tally = TickTally()
    while not stop.is_set():
        k, due = next_tick(start_mono, cadence.interval, monotonic(), after=last)
        if skipped(last, k):
            log.warning("timer_ticks_skipped", cadence=cadence.name, skipped=skipped(last, k))
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - monotonic()))
            break  # stop was set while waiting
        except TimeoutError:
            pass
        tick_id = f"{cadence.name}:{start_wall + k * cadence.interval:.3f}"
        command = cadence.command(tick_id, datetime.fromtimestamp(wall(), UTC))
        try:
            await publisher.publish(cadence.routing_key, [command], expiration=cadence.interval)
        except Exception as exc:  # a lost tick is replaced by the next one; keep the cadence
            ok = False
            log.warning("timer_tick_publish_failed", cadence=cadence.name, tick=k, error=repr(exc))
        else:
            ok = True
            published += 1
            if published_counts is not None:
                published_counts[cadence.name] += 1
            log.debug("timer_tick_published", cadence=cadence.name, tick=k, tick_id=tick_id)
        summary = tally.record(ok=ok, tick_id=tick_id, now=due)
        if summary is not None:
            log.info(
                "timer_ticks_summarized",
                cadence=cadence.name,
                published=summary.published,
                failed=summary.failed,
                window_s=summary.window_s,
                last_tick_id=summary.last_tick_id,
            )
        last = k
    return published
