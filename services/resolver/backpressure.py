"""Holding deliveries until the flush that carries their IPs, and bounding what is held.

A delivery is held while any of its IPs is unpersisted; an early (background) flush starts when
the held deliveries reach ``hold_limit`` or the dirty set reaches ``flush_max_dirty``, and a new
delivery waits while the dirty set is full (bulk messages carry up to 1000 IPs each, so the
prefetch alone does not bound memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.resolver.flushing import flush
from shared.ports import Ticket

if TYPE_CHECKING:
    from services.resolver.handlers import ResolverDeps

FLUSH_RETRY_DELAY = 1.0


async def hold_or_ack(ips: Sequence[str], ticket: Ticket, deps: ResolverDeps) -> None:
    """Ack now if every IP is persisted; else hold the delivery for the next flush."""
    if any(deps.cache.is_unpersisted(ip) for ip in ips):
        deps.state.held.append(ticket)
        if over_limits(deps):
            request_flush(deps, trigger="size")
    else:
        await deps.acker.ack([ticket])


async def wait_for_room(deps: ResolverDeps) -> None:
    """While the dirty set is full, a new delivery waits for the flush draining it."""
    while deps.cache.dirty_count >= deps.flush_max_dirty:
        flushing = request_flush(deps, trigger="size")
        if not await flushing:
            await asyncio.sleep(FLUSH_RETRY_DELAY)  # broker trouble: don't spin on failures


def request_flush(deps: ResolverDeps, *, trigger: str) -> asyncio.Task[bool]:
    """The running background flush, or a new one; its result says whether it succeeded."""
    state = deps.state
    for task in state.background:
        if not task.done():
            return task
    task = asyncio.create_task(flush_logged(deps, trigger))
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    return task


async def flush_logged(deps: ResolverDeps, trigger: str) -> bool:
    """Flush, logging a failure instead of raising; True once under the limits again."""
    # Deliveries held while this flush ran may have reached the limit again: flush until not.
    while True:
        try:
            await flush(deps, trigger=trigger)
        except Exception as exc:  # the entries are back in the dirty set; the next flush retries
            deps.log.warning("geo_cache_flush_failed", trigger=trigger, error=repr(exc))
            return False
        if not over_limits(deps):
            return True


def over_limits(deps: ResolverDeps) -> bool:
    return len(deps.state.held) >= deps.hold_limit or deps.cache.dirty_count >= deps.flush_max_dirty
