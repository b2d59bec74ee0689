"""Resolver handlers: plain async functions of (message, deps), bound in ``bootstrap.py``.

An ``ip.seen`` or ``geo.retry`` delivery is acked only once every answer it produced is confirmed
by the broker inside a ``geo.upsert`` message (or was already): the delivery is held until the
flush that carries its IPs (``flushing.py``), within the bounds of ``backpressure.py``;
``watchdog.py`` flushes when the timer does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from services.resolver.backpressure import hold_or_ack, wait_for_room
from services.resolver.cache import GeoCache
from services.resolver.flushing import flush
from services.resolver.geo import FAILED, NOT_GLOBAL, Geo
from services.resolver.known import KnownBatcher, known_answers
from services.resolver.lookup import GeoLookup
from services.resolver.watchdog import flush_watchdog
from shared.ipnorm import is_routable
from shared.messages import FlushDirty, IpSeen, Resolution, RetryUnresolved
from shared.ports import Acker, Publisher, Ticket

__all__ = [  # what bootstrap, lookup_requests and the tests import from here
    "ResolverDeps",
    "ResolverState",
    "flush",
    "flush_watchdog",
    "not_known",
    "on_flush_dirty",
    "on_ip_seen",
    "on_retry_unresolved",
]


@dataclass
class ResolverState:
    """Mutable runtime state owned by one resolver instance (never module-level)."""

    held: list[Ticket] = field(default_factory=list)
    flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: set[asyncio.Task[bool]] = field(default_factory=set)
    last_tick_id: str | None = None
    flushes: int = 0
    rows_flushed: int = 0
    lookups: int = 0
    lookup_requests: int = 0
    lookups_pending: int = 0
    lookups_running: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass(frozen=True)
class ResolverDeps:
    cache: GeoCache
    lookup: GeoLookup
    publisher: Publisher
    acker: Acker
    clock: Callable[[], float]
    hold_limit: int
    flush_max_dirty: int
    announce_resolved: bool = True
    known: KnownBatcher | None = None  # asks persistence what geo_cache knows, before providers
    state: ResolverState = field(default_factory=ResolverState)
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger("resolver")
    )


async def on_ip_seen(event: IpSeen, ticket: Ticket, deps: ResolverDeps) -> None:
    await wait_for_room(deps)
    ips = event.addresses
    deps.cache.note_seen(ips)
    await _resolve(await not_known(deps.cache.missing(ips, deps.clock()), deps), deps)
    await hold_or_ack(ips, ticket, deps)


async def not_known(misses: list[str], deps: ResolverDeps) -> list[str]:
    """The misses geo_cache holds no final answer for; the known ones go into the cache as
    already persisted (not dirty), so they cost no lookup and no row rewrite."""
    if deps.known is None or not misses:
        return misses
    rows = await deps.known.rows(misses)
    if not rows:
        return misses
    deps.cache.put_known(known_answers(rows))
    found = {row.ip for row in rows}
    return [ip for ip in misses if ip not in found]


async def on_retry_unresolved(cmd: RetryUnresolved, ticket: Ticket, deps: ResolverDeps) -> None:
    await wait_for_room(deps)
    deps.cache.note_retried(cmd.ips)
    if cmd.refresh:
        refreshed = await _refresh(cmd.ips, deps)
        deps.log.info("geo_refresh_ran", tick_id=cmd.tick_id, ips=len(cmd.ips), refreshed=refreshed)
        await hold_or_ack(cmd.ips, ticket, deps)
        return
    again = deps.cache.forget_failures(cmd.ips)
    # A private address is retried only when its row is gone (pruned; persistence asks for
    # sighted IPs without a row): no provider is asked, so no refresh would write it again.
    looked_up = set(again)
    again += [ip for ip in dict.fromkeys(cmd.ips) if ip not in looked_up and not is_routable(ip)]
    await _resolve(again, deps)
    deps.log.info("geo_retry_ran", tick_id=cmd.tick_id, ips=len(cmd.ips), looked_up=len(again))
    await hold_or_ack(cmd.ips, ticket, deps)


async def on_flush_dirty(cmd: FlushDirty, deps: ResolverDeps) -> None:
    state = deps.state
    if cmd.tick_id == state.last_tick_id:
        deps.log.info("geo_flush_duplicate_ignored", tick_id=cmd.tick_id)
        return
    previous, state.last_tick_id = state.last_tick_id, cmd.tick_id  # claim before awaiting
    try:
        await flush(deps, trigger=cmd.tick_id)
    except BaseException:
        state.last_tick_id = previous  # the command is requeued; let its redelivery run
        raise


async def _resolve(ips: Sequence[str], deps: ResolverDeps) -> None:
    """Look up ``ips`` (distinct, not cached) and put every answer, failures included, in cache."""
    if not ips:
        return
    routable = [ip for ip in ips if is_routable(ip)]
    answers: dict[str, Geo] = {}
    if routable:
        deps.state.lookups += len(routable)
        try:
            answers = dict(await deps.lookup.lookup(routable))
        except Exception as exc:  # a provider failure is a negative, never a lost IP
            deps.log.warning("geo_lookup_failed", ips=len(routable), error=repr(exc))
    now = deps.clock()
    deps.cache.put_many(((ip, answers.get(ip, FAILED)) for ip in routable), now)
    if len(routable) < len(ips):
        deps.cache.put_many(((ip, NOT_GLOBAL) for ip in set(ips).difference(routable)), now)


async def _refresh(ips: Sequence[str], deps: ResolverDeps) -> int:
    """Look up answered IPs again; only real answers replace the old ones (a failure, or a
    provider's "no", keeps the row as it is). Returns how many were answered."""
    routable = list(dict.fromkeys(ip for ip in ips if is_routable(ip)))
    if not routable:
        return 0
    deps.state.lookups += len(routable)
    try:
        answers = await deps.lookup.lookup(routable)
    except Exception as exc:  # the old answers stay
        deps.log.warning("geo_lookup_failed", ips=len(routable), error=repr(exc))
        return 0
    fresh = [(ip, geo) for ip, geo in answers.items() if geo.resolution is Resolution.RESOLVED]
    deps.cache.put_many(fresh, deps.clock())
    return len(fresh)
