"""Composition root of persistence: opens the geo_cache store and the transport (the broker, or
the in-memory one in tests), and gives each route of the table it consumes its handler."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial

import structlog

from services.persistence.handlers import (
    PersistenceDeps,
    on_geo_upsert_batch,
    on_known,
    on_re_resolve,
)
from services.persistence.ports import GeoRepository
from services.persistence.stores import describe, open_repository
from shared import routes
from shared.amqp import amqp_config
from shared.metrics import MetricsRegistry, serve_metrics
from shared.routes import Answers, Plain, Wiring, wire, wiring
from shared.settings import Settings
from shared.transport import OpenTransport, Transport, open_amqp

OpenStore = Callable[[Settings], Awaitable[GeoRepository]]


def persistence_routes(deps: PersistenceDeps) -> Wiring:
    return wiring(
        "persistence",
        wire(routes.UPSERT, Plain(partial(on_geo_upsert_batch, deps=deps))),
        wire(routes.RE_RESOLVE, Plain(partial(on_re_resolve, deps=deps))),
        wire(routes.KNOWN, Answers(partial(on_known, deps=deps))),
    )


def persistence_metrics(
    deps: PersistenceDeps, repository: GeoRepository, amqp: Transport
) -> MetricsRegistry:
    registry = MetricsRegistry("persistence")
    amqp.register_metrics(registry)
    state = deps.state
    registry.counter(
        "geo_upsert_batches_total", "geo.upsert messages committed.", lambda: state.batches
    )
    registry.counter("geo_rows_upserted_total", "Rows written to geo_cache.", lambda: state.rows)
    registry.counter("geo_sqlite_commits_total", "SQLite commits.", lambda: repository.commits)
    registry.counter(
        "geo_sqlite_reopens_total",
        "Times the store was reopened: the SQLite file found deleted or replaced, or PostgreSQL "
        "reconnected after a lost connection.",
        lambda: repository.reopens,
    )
    registry.counter(
        "geo_retries_requested_total",
        "IPs sent to the resolver by re-resolve.",
        lambda: state.retries_requested,
    )
    registry.counter(
        "geo_refreshes_requested_total",
        "Resolved rows older than GEO_MAX_AGE sent to the resolver by re-resolve.",
        lambda: state.refreshes_requested,
    )
    registry.counter(
        "geo_known_asked_total",
        "IPs the resolver asked about (geo.known).",
        lambda: state.known_asked,
    )
    registry.counter(
        "geo_known_answered_total",
        "IPs answered from geo_cache to geo.known.",
        lambda: state.known_answered,
    )
    return registry


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    transport: OpenTransport = open_amqp,
    store: OpenStore = open_repository,
) -> None:
    log = structlog.get_logger("persistence")
    async with AsyncExitStack() as resources:  # released in reverse order of acquisition
        repository = await store(settings)
        resources.push_async_callback(repository.close)
        amqp = await transport(amqp_config(settings), service="persistence", stop=stop)
        resources.push_async_callback(amqp.close)
        deps = PersistenceDeps(
            repository=repository,
            publisher=amqp.publisher,
            max_age=settings.max_age,
            refresh_per_tick=settings.refresh_per_tick,
        )
        try:
            await amqp.consume(persistence_routes(deps), prefetch=settings.prefetch)
            registry = persistence_metrics(deps, repository, amqp)
            metrics = await serve_metrics(settings, registry, amqp.health)
            if metrics is not None:
                resources.push_async_callback(metrics.stop)
            log.info("persistence_ready", **describe(settings))
            await stop.wait()
        finally:
            await amqp.stop_consuming(settings.drain_timeout)
            log.info(
                "persistence_counters",
                batches=deps.state.batches,
                rows=deps.state.rows,
                commits=repository.commits,
                reopens=repository.reopens,
                retries_requested=deps.state.retries_requested,
            )
