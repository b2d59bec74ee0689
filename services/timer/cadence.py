"""Fixed-cadence tick arithmetic: tick k is due at start + k * interval, on the monotonic clock.

Pure, so the "no drift, skip missed ticks, never bunch them" rule is unit-tested without a loop.
"""

from __future__ import annotations

import math


def next_tick(start: float, interval: float, now: float, after: int = 0) -> tuple[int, float]:
    """The first tick due after ``now`` and after tick number ``after``: (k, due time).

    Ticks missed while the caller was busy are skipped: the answer jumps to the next future one.
    Tick 0 (``start`` itself) never fires, so the first tick comes one full interval after start.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    elapsed = max(0.0, now - start)
    k = max(after + 1, math.floor(elapsed / interval) + 1, 1)
    return k, start + k * interval


def skipped(previous: int, current: int) -> int:
    """How many ticks were missed between two fired ticks."""
    return max(0, current - previous - 1)
