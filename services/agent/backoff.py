"""How long to wait before the next attempt at the broker: doubling from ``base`` up to ``cap``,
with jitter so that many agents cut off at once do not come back in step. Pure arithmetic."""

from __future__ import annotations


def retry_delay(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """``attempt`` counts from 0; ``jitter`` in [0, 1) picks a point in the upper half of the
    step, so the delay is always at least half of it and never above ``cap``."""
    step: float = min(cap, base * 2.0 ** min(attempt, 32))
    return step * (0.5 + 0.5 * jitter)
