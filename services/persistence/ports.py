"""The repository port: what persistence and the CLI need from ``geo_cache``, whatever the store.

Two implementations satisfy it: ``SqliteGeoRepository`` (the default, one file beside BanGUI) and
``PostgresGeoRepository`` (a database server, for several hosts); one test suite runs on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.messages import GeoRow


@dataclass(frozen=True)
class Sightings:
    """IPs that ``ip.seen`` mentioned (with no row of their own in the batch), and when: their
    ``last_seen`` is set to ``at`` unless it (or, when NULL, ``cached_at``) is already that day."""

    ips: Sequence[str]
    at: str  # ISO-8601 UTC, fixed width, as cached_at

    @property
    def day_start(self) -> str:
        return self.at[:10] + "T00:00:00.000000Z"


@dataclass(frozen=True)
class RetryBackoff:
    """Which ``failed`` rows re-resolve retries: those that first failed after ``young_after``
    (every tick), and older ones last tried before ``tried_before`` (about once a day)."""

    young_after: str
    tried_before: str


class GeoRepository(Protocol):
    """Writes and reads of ``geo_cache`` under the upsert rules: a newer answer wins, a failure
    never overwrites a country, a redelivered batch changes nothing."""

    commits: int
    reopens: int  # SQLite: the file found deleted or replaced; PostgreSQL: reconnections

    async def upsert_many(
        self,
        rows: Sequence[GeoRow],
        retried: Sequence[str] = (),
        seen: Sightings | None = None,
    ) -> int:
        """Apply ``rows`` (and ``seen``) in one transaction; returns the rows inserted or
        changed. ``retried``: the IPs among ``rows`` answered for a retry or refresh, not for a
        sighting, whose ``last_seen`` is kept (other updated rows fall back to ``cached_at``)."""
        ...

    async def unresolved_ips(self, backoff: RetryBackoff | None = None) -> list[str]:
        """IPs re-resolve retries: no country, and ``failed`` (due under ``backoff``, when
        given) or from the original table (always)."""
        ...

    async def known_rows(self, ips: Sequence[str]) -> list[GeoRow]:
        """The rows of ``ips`` with a final answer (``resolved``, ``not_global``,
        ``rejected``), in no particular order; the others are left out."""
        ...

    async def stale_ips(self, older_than: str, limit: int) -> list[str]:
        """Up to ``limit`` IPs of ``resolved`` rows with ``cached_at`` before ``older_than``,
        oldest first: the refresh of re-resolve."""
        ...

    async def missing(self, ips: Sequence[str]) -> list[str]:
        """Those of ``ips`` that have no row (pruned, or never written)."""
        ...

    async def count_unseen(self, before: str) -> int:
        """Rows last seen (``last_seen``, else ``cached_at``) before ``before``."""
        ...

    async def prune(self, before: str, chunk: int) -> int:
        """Delete the rows ``count_unseen`` counts, ``chunk`` rows per transaction, each
        chunk re-checking the condition (a row seen meanwhile stays); returns rows deleted."""
        ...

    async def close(self) -> None: ...
