"""``geo.lookup``: answer a component's "which countries are these IPs?" within its deadline.

Answers come from the memory cache, then from what geo_cache knows (``geo.known``), then from
the providers; new answers go into the dirty set and are persisted with the next flush, like an
``ip.seen``'s. An address not answered by the deadline is ``pending`` in the reply, and its
resolution carries on in the background all the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from services.resolver.cache import GeoCache
from services.resolver.handlers import ResolverDeps, _resolve, not_known
from shared.messages import PENDING, GeoLookupRequest

# Part of the requester's timeout kept for the reply's trip back: at most this much, or a tenth.
REPLY_MARGIN_S = 0.1


def answer_budget(timeout_ms: int) -> float:
    """Seconds the resolver may spend before replying to a request with ``timeout_ms``."""
    timeout = timeout_ms / 1000
    return max(0.0, timeout - min(REPLY_MARGIN_S, timeout / 10))


def reply_rows(ips: Sequence[str], cache: GeoCache, unanswered: set[str]) -> bytes:
    """The reply body: one row per requested address, in request order; ``pending`` for an
    address in ``unanswered`` or not cached."""
    rows: list[tuple[str | None, ...]] = []
    for ip in ips:
        geo = None if ip in unanswered else cache.peek(ip)
        cached_at = None if geo is None else cache.cached_at(ip)
        if geo is None or cached_at is None:
            rows.append((ip, PENDING, None, None, None, None, None, None))
        else:
            rows.append(
                (
                    ip,
                    geo.resolution.value,
                    cached_at,
                    geo.country_code,
                    geo.country_name,
                    geo.asn,
                    geo.org,
                    geo.provider,
                )
            )
    return b'{"rows":%s}' % json.dumps(rows, separators=(",", ":")).encode()


async def on_geo_lookup(request: GeoLookupRequest, deps: ResolverDeps) -> bytes:
    budget = answer_budget(request.timeout_ms)
    misses = deps.cache.missing(request.ips, deps.clock())
    unanswered: set[str] = set()
    if misses:
        work = asyncio.create_task(_answer(misses, deps))
        deps.state.lookups_running.add(work)
        work.add_done_callback(deps.state.lookups_running.discard)
        done, _ = await asyncio.wait({work}, timeout=budget)
        if not done:  # answer what is in by now; the rest is resolved and stored later
            unanswered = {ip for ip in misses if _still_open(ip, deps.cache)}
            deps.state.lookups_pending += len(unanswered)
    deps.state.lookup_requests += 1
    deps.log.debug(
        "geo_lookup_answered", ips=len(request.ips), missed=len(misses), pending=len(unanswered)
    )
    return reply_rows(request.ips, deps.cache, unanswered)


def _still_open(ip: str, cache: GeoCache) -> bool:
    geo = cache.peek(ip)
    return geo is None or geo.retryable


async def _answer(misses: list[str], deps: ResolverDeps) -> None:
    try:
        await _resolve(await not_known(misses, deps), deps)
    except Exception as exc:  # logged, never lost silently: the reply says pending
        deps.log.warning("geo_lookup_request_failed", ips=len(misses), error=repr(exc))
