"""The flush watchdog: the timer normally drives flushes; without it (not started, or down)
held deliveries would wait until the broker's consumer timeout (30 min by default) closes the
channel, so the resolver flushes on its own when no flush ran for a while."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.resolver.backpressure import flush_logged

if TYPE_CHECKING:
    from services.resolver.handlers import ResolverDeps


async def flush_watchdog(deps: ResolverDeps, period: float, stop: asyncio.Event) -> None:
    """Flush on our own when no flush ran for ``period`` while deliveries wait."""
    last = deps.state.flushes
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
            return
        except TimeoutError:
            pass
        if deps.state.flushes == last and (deps.state.held or deps.cache.dirty_count):
            deps.log.warning(
                "geo_flush_watchdog_fired",
                held=len(deps.state.held),
                dirty=deps.cache.dirty_count,
                period_s=period,
            )
            await flush_logged(deps, "watchdog")
        last = deps.state.flushes
