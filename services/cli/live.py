"""``bangui-geo lookup --live``: ask the resolver over the broker (``geo.lookup``) instead of
reading the file, so it works on any host that reaches the broker, and answers unknown IPs too."""

from __future__ import annotations

from collections.abc import Sequence

from services.cli.errors import EXIT_FAILED, CliError
from shared.client import BrokerError, GeoClient


async def live_lookup(
    ips: Sequence[str], *, amqp_url: str, connect_timeout: float, deadline: float
) -> dict[str, tuple[str | None, ...]]:
    """The rows as ``database.lookup`` returns them (country, name, asn, org, resolution,
    provider, cached_at), keyed by address; a pending address has only its resolution."""
    try:
        async with GeoClient.connect(amqp_url, connect_timeout=connect_timeout) as geo:
            rows = await geo.lookup(ips, timeout=deadline)
    except BrokerError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    return {
        row.ip: (
            row.country_code,
            row.country_name,
            row.asn,
            row.org,
            row.resolution,
            row.provider,
            row.cached_at,
        )
        for row in rows
    }
