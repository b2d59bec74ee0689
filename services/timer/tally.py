"""How many ticks the timer published since it last said so: each tick is logged at debug, and
at most one info line a minute per cadence carries the counts, so a healthy timer is quiet.

Pure (the caller passes ``now``), so the summary rule is tested without a clock or a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

SUMMARY_EVERY = 60.0


@dataclass(frozen=True)
class TickSummary:
    published: int
    failed: int
    window_s: float
    last_tick_id: str


@dataclass
class TickTally:
    every: float = SUMMARY_EVERY
    published: int = 0
    failed: int = 0
    _since: float | None = None

    def record(self, *, ok: bool, tick_id: str, now: float) -> TickSummary | None:
        """Count one tick; return the summary to log when the first tick or ``every`` seconds
        since the last summary have come, and start a new window."""
        if ok:
            self.published += 1
        else:
            self.failed += 1
        if self._since is not None and now - self._since < self.every:
            return None
        summary = TickSummary(
            self.published,
            self.failed,
            0.0 if self._since is None else round(now - self._since, 1),
            tick_id,
        )
        self.published = self.failed = 0
        self._since = now
        return summary
