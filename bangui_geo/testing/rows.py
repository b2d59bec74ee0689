"""``geo_cache`` rows made to order for tests of a store: one builder on a fixed clock (``T0``), and
the original BanGUI's table with two of its rows, to prove the migration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.messages import GeoRow, Resolution, iso_utc

T0 = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
LEGACY_TABLE = (
    "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
    " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"
)
LEGACY_ROWS = [
    ("8.8.8.8", "US", "United States", "AS15169", "Google LLC", "2024-01-01 00:00"),
    ("9.9.9.9", None, None, None, None, "2024-01-01 00:00"),
]


def row(
    ip: str,
    code: str | None = "US",
    *,
    minutes: int = 0,
    resolution: Resolution | None = None,
    provider: str | None = "embedded",
) -> GeoRow:
    """A row for ``ip`` cached ``minutes`` after ``T0``: resolved to ``code``, or failed."""
    if resolution is None:
        resolution = Resolution.RESOLVED if code else Resolution.FAILED
    return GeoRow(
        ip=ip,
        resolution=resolution,
        cached_at=iso_utc(T0 + timedelta(minutes=minutes)),
        country_code=code,
        country_name={"US": "United States", "DE": "Germany"}.get(code or ""),
        provider=provider,
    )
