"""A textual progress bar on stderr, for inputs large enough to take a while to publish."""

from __future__ import annotations

import time
from typing import TextIO

BAR_WIDTH = 30
MIN_INTERVAL = 0.1  # seconds between redraws


class ProgressBar:
    """Redraws one line with ``\\r``; ``finish`` ends it with a newline. Disabled, it is silent."""

    def __init__(self, total: int, stream: TextIO, *, enabled: bool, label: str = "IPs") -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._enabled = enabled and total > 0
        self._label = label
        self._drawn_at = 0.0

    def advance(self, count: int) -> None:
        self.done = min(self.total, self.done + count)
        now = time.monotonic()
        if self.done == self.total or now - self._drawn_at >= MIN_INTERVAL:
            self._draw()
            self._drawn_at = now

    def finish(self) -> None:
        if self._enabled:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()

    def render(self) -> str:
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        percent = 100 * self.done // self.total if self.total else 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"[{bar}] {percent:3d}% {self.done:,}/{self.total:,} {self._label}"

    def _draw(self) -> None:
        if self._enabled:
            self._stream.write("\r" + self.render())
            self._stream.flush()
