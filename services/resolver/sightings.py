"""The ``geo.upsert`` bodies of a flush, with what feeds ``geo_cache.last_seen``: each row batch
names its rows answered for a retry (``retried``), and the IPs ``ip.seen`` mentioned without a
row of their own go in batches of their own (``seen``).

Both fields are optional in ``GeoUpsertBatch``, so a persistence that predates them applies the
rows and ignores the rest. A sightings batch still needs one row (``rows`` has at least one): it
carries one seen IP's cached answer, unchanged, whose upsert rewrites the row as it is.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from services.resolver.cache import DirtyEntry, FlushSightings, GeoCache
from shared.messages import (
    MAX_IPS_PER_MESSAGE,
    MAX_ROWS_PER_UPSERT,
    RowParts,
    encode_rows,
    iso_utc_from_epoch,
    upsert_body,
)


def upsert_bodies(
    entries: Sequence[DirtyEntry],
    rows: Sequence[bytes],
    sightings: FlushSightings,
    cache: GeoCache,
    now: float,
) -> list[bytes]:
    """One body per row batch (``rows[i]`` encodes ``entries``' i-th slice of
    ``MAX_ROWS_PER_UPSERT``), then the sightings."""
    bodies: list[bytes] = []
    retried = sightings.retried
    for i, batch_rows in enumerate(rows):
        ips: list[str] = []
        if retried:
            batch = entries[i * MAX_ROWS_PER_UPSERT : (i + 1) * MAX_ROWS_PER_UPSERT]
            ips = [e.ip for e in batch if e.ip in retried]
        bodies.append(upsert_body(uuid.uuid4().hex, batch_rows, retried=ips))
    if sightings.seen:
        bodies.extend(sighting_bodies(sightings.seen, cache, now))
    return bodies


def sighting_bodies(seen: Sequence[str], cache: GeoCache, now: float) -> list[bytes]:
    """``seen`` in batches of up to 1000 IPs, each with a carrier row (see the module's text);
    a batch none of whose IPs is cached any more is dropped (no row to carry it)."""
    at = iso_utc_from_epoch(now)
    out: list[bytes] = []
    for start in range(0, len(seen), MAX_IPS_PER_MESSAGE):
        chunk = seen[start : start + MAX_IPS_PER_MESSAGE]
        carrier = _carrier(chunk, cache)
        if carrier is None:
            continue
        rows = encode_rows([carrier])
        out.append(upsert_body(uuid.uuid4().hex, rows, seen=(at, chunk)))
    return out


def _carrier(ips: Sequence[str], cache: GeoCache) -> RowParts | None:
    """The row of the first IP whose answer is cached and already persisted."""
    for ip in ips:
        geo = cache.peek(ip)
        cached_at = cache.cached_at(ip)
        if geo is None or cached_at is None or cache.is_unpersisted(ip):
            continue
        return (ip, geo, cached_at)
    return None
