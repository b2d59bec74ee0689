"""Composition root of the resolver: the only place that names concrete adapters.

``build_deps`` binds real or fake adapters into ``ResolverDeps``; ``resolver_routes`` gives each
route of the table the resolver consumes its handler; ``run`` owns the transport's lifetime (the
real broker, or the in-memory one in tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial

import structlog

from services.resolver.cache import GeoCache
from services.resolver.handlers import (
    ResolverDeps,
    flush,
    flush_watchdog,
    on_flush_dirty,
    on_ip_seen,
    on_retry_unresolved,
)
from services.resolver.known import KnownBatcher
from services.resolver.lookup import GeoLookup, ProviderChain
from services.resolver.lookup_requests import on_geo_lookup
from services.resolver.providers.embedded import EmbeddedProvider
from services.resolver.providers.ipapi import IpApiProvider
from services.resolver.providers.mmdb import MmdbProvider
from services.resolver.stuck import resolver_amqp_config
from shared import routes, topology
from shared.metrics import MetricsRegistry, serve_metrics
from shared.ports import Acker, Publisher
from shared.routes import Answers, Deferred, Plain, Wiring, wire, wiring
from shared.settings import Settings
from shared.transport import OpenTransport, Transport, open_amqp

# With no geo.flush for this many flush intervals, the resolver flushes by itself.
WATCHDOG_INTERVALS = 3


def build_lookup(settings: Settings) -> GeoLookup:
    factories: dict[str, Callable[[], GeoLookup]] = {
        "embedded": EmbeddedProvider,
        "ip-api": partial(IpApiProvider.from_settings, settings),
        "mmdb": partial(MmdbProvider.from_settings, settings),
    }
    return ProviderChain([factories[name]() for name in settings.provider_chain])


def build_deps(
    settings: Settings,
    *,
    lookup: GeoLookup,
    publisher: Publisher,
    acker: Acker,
    clock: Callable[[], float] = time.time,
    known: KnownBatcher | None = None,
) -> ResolverDeps:
    return ResolverDeps(
        cache=GeoCache(settings.cache_max_entries, settings.negative_ttl),
        lookup=lookup,
        publisher=publisher,
        acker=acker,
        clock=clock,
        hold_limit=max(1, settings.prefetch // 2),
        flush_max_dirty=settings.flush_max_dirty,
        announce_resolved=settings.publish_resolved,
        known=known,
    )


def resolver_routes(deps: ResolverDeps) -> Wiring:
    return wiring(
        "resolver",
        wire(routes.FLUSH, Plain(partial(on_flush_dirty, deps=deps))),
        wire(routes.IP_SEEN, Deferred(partial(on_ip_seen, deps=deps))),
        wire(routes.LOOKUP, Answers(partial(on_geo_lookup, deps=deps))),
        wire(routes.RETRY, Deferred(partial(on_retry_unresolved, deps=deps))),
    )


def resolver_metrics(deps: ResolverDeps, amqp: Transport) -> MetricsRegistry:
    registry = MetricsRegistry("resolver")
    amqp.register_metrics(registry)
    cache, state = deps.cache, deps.state
    registry.counter(
        "geo_cache_hits_total", "ip.seen IPs answered from the cache.", lambda: cache.hits
    )
    registry.counter("geo_cache_misses_total", "IPs that needed a lookup.", lambda: cache.misses)
    registry.gauge("geo_cache_entries", "IPs held in the memory cache.", lambda: len(cache))
    registry.gauge("geo_cache_dirty", "Cached answers not yet flushed.", lambda: cache.dirty_count)
    registry.gauge(
        "geo_cache_negative", "Failed lookups in the negative cache.", lambda: cache.negative_count
    )
    registry.gauge(
        "geo_deliveries_held",
        "ip.seen/geo.retry deliveries held until flushed.",
        lambda: len(state.held),
    )
    registry.counter("geo_flushes_total", "Flushes run.", lambda: state.flushes)
    registry.counter(
        "geo_rows_flushed_total", "Rows published as geo.upsert.", lambda: state.rows_flushed
    )
    registry.counter("geo_lookups_total", "IPs sent to the provider chain.", lambda: state.lookups)
    registry.counter(
        "geo_lookup_requests_total", "geo.lookup requests answered.", lambda: state.lookup_requests
    )
    registry.counter(
        "geo_lookup_pending_total",
        "geo.lookup addresses answered pending (deadline).",
        lambda: state.lookups_pending,
    )
    known = deps.known
    if known is not None:
        registry.counter(
            "geo_known_asked_total", "Cache misses asked of geo_cache.", lambda: known.asked
        )
        registry.counter("geo_known_hits_total", "Misses geo_cache answered.", lambda: known.known)
        registry.counter(
            "geo_known_timeouts_total", "geo.known questions unanswered.", lambda: known.timeouts
        )
    for provider in getattr(deps.lookup, "providers", (deps.lookup,)):
        register = getattr(provider, "register_metrics", None)
        if register is not None:
            register(registry)
    return registry


async def run(
    settings: Settings, stop: asyncio.Event, *, transport: OpenTransport = open_amqp
) -> None:
    log = structlog.get_logger("resolver")
    async with AsyncExitStack() as resources:  # released in reverse order of acquisition
        lookup = build_lookup(settings)  # before the broker: a bad provider file fails fast
        resources.push_async_callback(lookup.close)
        amqp = await transport(resolver_amqp_config(settings), service="resolver", stop=stop)
        resources.push_async_callback(amqp.close)
        requester = await amqp.requester()
        # No TTL on geo.known: its queue dead-letters what expires there, and an unanswered
        # question is no bad input (the resolver stops asking for a while after one, so no
        # backlog builds up while persistence is away; a late answer is dropped).
        ask = partial(requester.request, topology.KNOWN, expire=False)
        known = KnownBatcher(ask, settings.known_timeout)
        deps = build_deps(
            settings, lookup=lookup, publisher=amqp.publisher, acker=amqp, known=known
        )
        try:
            await amqp.consume(resolver_routes(deps), prefetch=settings.prefetch)
            metrics = await serve_metrics(settings, resolver_metrics(deps, amqp), amqp.health)
            if metrics is not None:
                resources.push_async_callback(metrics.stop)
            log.info("resolver_ready", provider=lookup.name, prefetch=settings.prefetch)
            await flush_watchdog(deps, WATCHDOG_INTERVALS * settings.flush_interval, stop)
        finally:
            await amqp.stop_consuming(settings.drain_timeout)
            running = [*deps.state.background, *deps.state.lookups_running]
            if running:
                await asyncio.wait(running, timeout=settings.drain_timeout)
            try:
                rows = await flush(deps, trigger="shutdown")
                log.info("resolver_final_flush_ran", rows=rows)
            except Exception as exc:  # held deliveries stay unacked: the broker redelivers them
                log.warning("resolver_final_flush_failed", error=repr(exc))
            log.info(
                "resolver_counters",
                cached=len(deps.cache),
                lookups=deps.state.lookups,
                flushes=deps.state.flushes,
                rows_flushed=deps.state.rows_flushed,
                cache_hits=deps.cache.hits,
                cache_misses=deps.cache.misses,
            )
