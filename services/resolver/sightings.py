"""The ``geo.upsert`` bodies of a flush, with what feeds ``geo_cache.last_seen``: each row batch
names its rows answered for a retry (``retried``), and the IPs ``ip.seen`` mentioned without a
row of their own go in batches of their own (``seen``).

Both fields are optional in ``GeoUpsertBatch``, so a persistence that predates them applies the
rows and ignores the rest. A sightings batch still needs one row (``rows`` has at least one): it
carries one seen IP's cached answer, unchanged, whose upsert rewrites the row as it is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from services.resolver.cache import DirtyEntry, FlushSightings, GeoCache
from shared.messages import MAX_IPS_PER_MESSAGE, iso_utc_from_epoch


def upsert_bodies(
    batches: Sequence[Sequence[DirtyEntry]],
    rows: Sequence[bytes],
    sightings: FlushSightings,
    cache: GeoCache,
    now: float,
) -> list[bytes]:
    """One body per row batch (``rows[i]`` is the JSON of ``batches[i]``), then the sightings."""
    bodies: list[bytes] = []
    retried = sightings.retried
    for batch, batch_rows in zip(batches, rows, strict=True):
        extra = b""
        if retried:
            ips = [e.ip for e in batch if e.ip in retried]
            if ips:
                extra = b',"retried":' + json.dumps(ips).encode()
        bodies.append(b'{"batch_id":"%s","rows":%s%s}' % (_batch_id(), batch_rows, extra))
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
        body = {"rows": [carrier], "seen": {"at": at, "ips": list(chunk)}}
        out.append(b'{"batch_id":"%s",%s' % (_batch_id(), json.dumps(body).encode()[1:]))
    return out


def _carrier(ips: Sequence[str], cache: GeoCache) -> list[object] | None:
    """The row of the first IP whose answer is cached and already persisted."""
    for ip in ips:
        geo = cache.peek(ip)
        cached_at = cache.cached_at(ip)
        if geo is None or cached_at is None or cache.is_unpersisted(ip):
            continue
        return [
            ip,
            geo.resolution,
            cached_at,
            geo.country_code,
            geo.country_name,
            geo.asn,
            geo.org,
            geo.provider,
        ]
    return None


def _batch_id() -> bytes:
    return uuid.uuid4().hex.encode()
