"""Persistence handlers: apply upsert batches, and answer re-resolve with retries for the resolver.

The AMQP layer acks a ``geo.upsert`` delivery only after ``on_geo_upsert_batch`` returns, that is
after the commit; a locked or full database, or a database file deleted or replaced under us,
raises ``Transient`` so the batch is requeued. Rows dated in the future are refused here, not in
the model, because the check needs the clock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import structlog

from services.persistence.ports import GeoRepository, RetryBackoff, Sightings
from services.persistence.repository import DatabaseReplaced, is_transient
from shared import topology
from shared.errors import Rejected, Transient
from shared.ipnorm import is_routable, normalize_ip
from shared.messages import (
    MAX_IPS_PER_MESSAGE,
    GeoRow,
    GeoUpsertBatch,
    KnownQuery,
    ReResolveStale,
    RetryUnresolved,
    iso_utc_from_epoch,
)
from shared.ports import Publisher


@dataclass
class PersistenceState:
    batches: int = 0
    rows: int = 0
    retries_requested: int = 0
    refreshes_requested: int = 0
    known_asked: int = 0
    known_answered: int = 0


@dataclass(frozen=True)
class PersistenceDeps:
    repository: GeoRepository
    publisher: Publisher
    state: PersistenceState = field(default_factory=PersistenceState)
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger("persistence")
    )
    clock: Callable[[], float] = time.time
    max_age: float = 0.0  # seconds; 0: resolved rows are never refreshed
    refresh_per_tick: int = 0
    # Seconds (GEO_FAILED_MAX_AGE) a failed row is retried at every tick; older, once a day.
    # None: every failed row at every tick.
    failed_max_age: float | None = None


# How far a row's cached_at may be ahead of persistence's clock: the resolver's clock may run a
# little fast, but a row dated later than that would win every later upsert (newer answers win).
MAX_CLOCK_SKEW_S = 300.0
_CACHED_AT = itemgetter(2)
# A failed row older than failed_max_age is retried when its last attempt is this old.
FAILED_RETRY_EVERY_S = 86_400.0


def future_rows(rows: Sequence[GeoRow], now: float) -> list[int]:
    """Indexes of rows whose ``cached_at`` is more than the allowed skew after ``now``.

    ``cached_at`` has a fixed width, so text order is time order: one ``max`` in C per batch.
    """
    limit = iso_utc_from_epoch(now + MAX_CLOCK_SKEW_S)
    if max(map(_CACHED_AT, rows)) <= limit:
        return []
    return [i for i, row in enumerate(rows) if row.cached_at > limit]


async def on_geo_upsert_batch(cmd: GeoUpsertBatch, deps: PersistenceDeps) -> None:
    started = time.perf_counter()
    ahead = future_rows(cmd.rows, deps.clock())
    if ahead:
        first = cmd.rows[ahead[0]].cached_at
        raise Rejected(
            f"rows.{ahead[0]}: cached_at {first} is more than {MAX_CLOCK_SKEW_S:.0f} s ahead of "
            f"persistence's clock ({len(ahead)} such rows; nothing written)"
        )
    seen = None
    if cmd.seen is not None:
        if cmd.seen.at > iso_utc_from_epoch(deps.clock() + MAX_CLOCK_SKEW_S):
            raise Rejected(
                f"seen.at: {cmd.seen.at} is more than {MAX_CLOCK_SKEW_S:.0f} s ahead of "
                "persistence's clock (nothing written)"
            )
        seen = Sightings(cmd.seen.ips, cmd.seen.at)
    try:
        changed = await deps.repository.upsert_many(cmd.rows, cmd.retried, seen)
    except DatabaseReplaced as exc:
        raise Transient(str(exc)) from exc
    except sqlite3.Error as exc:
        if is_transient(exc):
            raise Transient(f"geo_cache write failed: {exc}") from exc
        raise
    if seen is not None:
        await _look_up_again(seen.ips, cmd.batch_id, deps)
    deps.state.batches += 1
    deps.state.rows += len(cmd.rows)
    deps.log.info(
        "geo_upserts_applied",
        batch_id=cmd.batch_id,
        rows=len(cmd.rows),
        changed=changed,
        seen=0 if seen is None else len(seen.ips),
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
    )


async def _look_up_again(seen: Sequence[str], batch_id: str, deps: PersistenceDeps) -> None:
    """Sighted IPs with no row (pruned while a resolver still caches them: a cache hit writes no
    row) go back to the resolvers to be looked up and written again: as a retry (for an IP a
    resolver holds a failure for, or none) and as a refresh (for one it holds an answer for)."""
    gone = await deps.repository.missing(seen)
    if not gone:
        return
    tick_id = f"seen:{batch_id}"
    await deps.publisher.publish(
        topology.RETRY,
        [
            RetryUnresolved(tick_id=tick_id, ips=gone[i : i + MAX_IPS_PER_MESSAGE], refresh=again)
            for again in (False, True)
            for i in range(0, len(gone), MAX_IPS_PER_MESSAGE)
        ],
    )
    deps.state.refreshes_requested += len(gone)
    deps.log.info("geo_pruned_rows_requested", ips=len(gone), batch_id=batch_id)


async def on_re_resolve(cmd: ReResolveStale, deps: PersistenceDeps) -> None:
    try:
        stored = await deps.repository.unresolved_ips(retry_backoff(deps))
    except DatabaseReplaced as exc:
        raise Transient(str(exc)) from exc
    ips = _retryable(stored)
    stale = await _stale(deps)
    batches = [
        RetryUnresolved(tick_id=cmd.tick_id, ips=ips[i : i + MAX_IPS_PER_MESSAGE])
        for i in range(0, len(ips), MAX_IPS_PER_MESSAGE)
    ] + [
        RetryUnresolved(tick_id=cmd.tick_id, ips=stale[i : i + MAX_IPS_PER_MESSAGE], refresh=True)
        for i in range(0, len(stale), MAX_IPS_PER_MESSAGE)
    ]
    if batches:
        await deps.publisher.publish(topology.RETRY, batches)
    deps.state.retries_requested += len(ips)
    deps.state.refreshes_requested += len(stale)
    deps.log.info(
        "geo_re_resolve_ran",
        tick_id=cmd.tick_id,
        unresolved=len(stored),
        retried=len(ips),
        refreshed=len(stale),
        batches=len(batches),
    )


def retry_backoff(deps: PersistenceDeps) -> RetryBackoff | None:
    """Failed rows younger than ``failed_max_age`` every tick, older ones once a day."""
    if deps.failed_max_age is None:
        return None
    now = deps.clock()
    return RetryBackoff(
        young_after=iso_utc_from_epoch(now - deps.failed_max_age),
        tried_before=iso_utc_from_epoch(now - FAILED_RETRY_EVERY_S),
    )


async def _stale(deps: PersistenceDeps) -> list[str]:
    """Resolved rows older than ``max_age``, oldest first, at most ``refresh_per_tick``."""
    if deps.max_age <= 0 or deps.refresh_per_tick <= 0:
        return []
    cutoff = iso_utc_from_epoch(deps.clock() - deps.max_age)
    try:
        stored = await deps.repository.stale_ips(cutoff, deps.refresh_per_tick)
    except DatabaseReplaced as exc:
        raise Transient(str(exc)) from exc
    return _retryable(stored)


async def on_known(cmd: KnownQuery, deps: PersistenceDeps) -> bytes:
    """Answer the resolver's "which of these do you know?" with the final rows among them."""
    try:
        rows = await deps.repository.known_rows(cmd.ips)
    except DatabaseReplaced as exc:
        raise Transient(str(exc)) from exc
    deps.state.known_asked += len(cmd.ips)
    deps.state.known_answered += len(rows)
    deps.log.debug("geo_known_answered", asked=len(cmd.ips), known=len(rows))
    return b'{"rows":%s}' % json.dumps(rows, separators=(",", ":")).encode()


def _retryable(stored: list[str]) -> list[str]:
    """Normalized, routable, distinct IPs; legacy rows may hold other spellings or junk."""
    out: dict[str, None] = {}
    for raw in stored:
        try:
            ip = normalize_ip(raw)
        except ValueError:
            continue
        if is_routable(ip):
            out[ip] = None
    return list(out)
