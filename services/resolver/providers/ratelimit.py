"""When the ip-api client may send its next request: the request budget and the failure backoff.

ip-api bans addresses that keep breaking its limit, so this arithmetic must be right; it is kept
free of I/O and of the clock (every method takes ``now``) so it is unit-tested without a loop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RequestBudget:
    """At most ``limit`` requests in any ``window`` (+ ``margin``) seconds, narrowed by the server.

    The local rule is a sliding log of send times. The server's own view (``X-Rl`` requests
    remaining, ``X-Ttl`` seconds until its window resets) is followed too: when it says nothing
    is left, nothing is sent before its reset, whatever the local log allows. ``margin`` covers
    the latency between our clock and the server's window when the headers are missing.
    """

    limit: int
    window: float
    margin: float = 0.0
    _sent: deque[float] = field(default_factory=deque, init=False, repr=False)
    _server_remaining: int | None = field(default=None, init=False)
    _server_reset: float = field(default=-math.inf, init=False)
    _blocked_until: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")
        if self.window <= 0 or self.margin < 0:
            raise ValueError("window must be positive and margin not negative")

    def next_allowed(self, now: float) -> float:
        """The earliest time, ``now`` or later, at which a request may be sent."""
        at = max(now, self._blocked_until)
        span = self.window + self.margin
        recent = [t for t in self._sent if t > at - span]
        if len(recent) >= self.limit:
            at = max(at, recent[-self.limit] + span)
        if self._server_remaining is not None and self._server_remaining <= 0:
            at = max(at, self._server_reset)
        return at

    def record_sent(self, now: float) -> None:
        self._sent.append(now)
        while self._sent and self._sent[0] <= now - (self.window + self.margin):
            self._sent.popleft()
        if self._server_remaining is not None:
            if now >= self._server_reset:  # the server's window has rolled over
                self._server_remaining = None
            else:
                self._server_remaining -= 1

    def observe(self, now: float, remaining: int | None, ttl: float | None) -> None:
        """Take the server's ``X-Rl``/``X-Ttl`` from a response received at ``now``."""
        if remaining is None or ttl is None:
            return
        self._server_remaining = max(0, remaining)
        self._server_reset = now + max(0.0, ttl)

    def block_until(self, until: float) -> None:
        """Send nothing before ``until`` (a 429's ``X-Ttl``, or a failure backoff)."""
        self._blocked_until = max(self._blocked_until, until)

    def blocked_until(self) -> float:
        return self._blocked_until


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": the n-th failure in a row waits between half and
    all of ``min(cap, base * 2**(n-1))``, so clients spread out yet never retry at once."""

    base: float = 1.0
    cap: float = 60.0
    failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("base must be positive and cap at least base")

    def failed(self, jitter: float) -> float:
        """Count a failure and return the delay before the next attempt; ``jitter`` is in [0, 1)."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures - 1, 62))
        return ceiling / 2 + ceiling / 2 * min(max(jitter, 0.0), 1.0)

    def succeeded(self) -> None:
        self.failures = 0
