"""The repository port: what persistence and the CLI need from ``geo_cache``, whatever the store.

Two implementations satisfy it: ``SqliteGeoRepository`` (the default, one file beside BanGUI) and
``PostgresGeoRepository`` (a database server, for several hosts); one test suite runs on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.messages import GeoRow


class GeoRepository(Protocol):
    """Writes and reads of ``geo_cache`` under the upsert rules: a newer answer wins, a failure
    never overwrites a country, a redelivered batch changes nothing."""

    commits: int
    reopens: int  # SQLite: the file found deleted or replaced; PostgreSQL: reconnections

    async def upsert_many(self, rows: Sequence[GeoRow]) -> int:
        """Apply ``rows`` in one transaction; returns the rows inserted or changed."""
        ...

    async def unresolved_ips(self) -> list[str]:
        """IPs re-resolve retries: no country, and ``failed`` or from the original table."""
        ...

    async def known_rows(self, ips: Sequence[str]) -> list[GeoRow]:
        """The rows of ``ips`` with a final answer (``resolved``, ``not_global``,
        ``rejected``), in no particular order; the others are left out."""
        ...

    async def stale_ips(self, older_than: str, limit: int) -> list[str]:
        """Up to ``limit`` IPs of ``resolved`` rows with ``cached_at`` before ``older_than``,
        oldest first: the refresh of re-resolve."""
        ...

    async def close(self) -> None: ...
