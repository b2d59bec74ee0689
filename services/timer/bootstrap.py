"""Composition root of the timer: leader election (``leadership.py``), then the two cadences
under one TaskGroup.

Only the timer holding the ``geo.timer.leader`` exclusive queue publishes; others wait as
standbys and take over when the leader's connection dies (the broker drops the queue then). The
leader checks every second that it still holds the lock: after a lost connection it reconnects
to find a standby leading, and steps down to standby itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial

import structlog

from services.timer.leadership import hold_lead, wait_to_lead
from services.timer.ticker import Cadence, tick_forever
from shared import topology
from shared.amqp import amqp_config
from shared.messages import FlushDirty, ReResolveStale
from shared.metrics import MetricsRegistry, serve_metrics
from shared.settings import Settings
from shared.transport import OpenTransport, open_amqp


def cadences(settings: Settings) -> tuple[Cadence, Cadence]:
    return (
        Cadence("flush", topology.FLUSH, settings.flush_interval, _flush),
        Cadence("re_resolve", topology.RE_RESOLVE, settings.re_resolve_interval, _re_resolve),
    )


def _flush(tick_id: str, issued_at: object) -> FlushDirty:
    return FlushDirty.model_validate({"tick_id": tick_id, "issued_at": issued_at})


def _re_resolve(tick_id: str, issued_at: object) -> ReResolveStale:
    return ReResolveStale.model_validate({"tick_id": tick_id, "issued_at": issued_at})


async def run(
    settings: Settings, stop: asyncio.Event, *, transport: OpenTransport = open_amqp
) -> None:
    log = structlog.get_logger("timer")
    async with AsyncExitStack() as resources:  # released in reverse order of acquisition
        amqp = await transport(amqp_config(settings), service="timer", stop=stop)
        resources.push_async_callback(amqp.close)
        status = TimerStatus()
        metrics = await serve_metrics(settings, timer_metrics(status), amqp.health)
        if metrics is not None:
            resources.push_async_callback(metrics.stop)
        reconnected = asyncio.Event()  # a leader checks its lock at once after a reconnect
        amqp.on_reconnect(reconnected.set)
        while await wait_to_lead(amqp, stop, log):
            status.leading = True
            log.info(
                "timer_leading",
                flush_interval=settings.flush_interval,
                re_resolve_interval=settings.re_resolve_interval,
            )
            term_over = asyncio.Event()
            # One anchor for every cadence: re-resolve tick k is due exactly k of its intervals
            # after the flush cadence's start, not a millisecond later.
            anchor = (time.monotonic(), time.time())
            async with asyncio.TaskGroup() as group:
                for cadence in cadences(settings):
                    group.create_task(
                        tick_forever(
                            cadence, amqp.publisher, term_over, status.published, anchor=anchor
                        )
                    )
                lost = await hold_lead(amqp, stop, reconnected, log)
                term_over.set()
            status.leading = False
            if not lost:
                return
            log.warning("timer_leadership_lost", lock=topology.TIMER_LEADER_QUEUE)


@dataclass
class TimerStatus:
    leading: bool = False
    published: Counter[str] = field(default_factory=Counter)


def timer_metrics(status: TimerStatus) -> MetricsRegistry:
    registry = MetricsRegistry("timer")
    registry.gauge(
        "geo_timer_leading",
        "1 while this timer holds the leader lock.",
        lambda: int(status.leading),
    )
    for name in ("flush", "re_resolve"):
        registry.counter(
            "geo_timer_ticks_total",
            "Commands published.",
            partial(status.published.__getitem__, name),
            cadence=name,
        )
    return registry
