"""Composition root of persistence: opens the geo_cache store and the broker, wires the queues."""

from __future__ import annotations

import asyncio
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
from shared import topology
from shared.amqp import Amqp, amqp_config
from shared.messages import GeoUpsertBatch, KnownQuery, ReResolveStale
from shared.metrics import MetricsRegistry, serve_metrics
from shared.settings import Settings

UPSERT_PREFETCH = 8
KNOWN_PREFETCH = 16


def persistence_metrics(
    deps: PersistenceDeps, repository: GeoRepository, amqp: Amqp
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


async def run(settings: Settings, stop: asyncio.Event) -> None:
    log = structlog.get_logger("persistence")
    async with AsyncExitStack() as resources:  # released in reverse order of acquisition
        repository = await open_repository(settings)
        resources.push_async_callback(repository.close)
        amqp = await Amqp.open(amqp_config(settings), service="persistence", stop=stop)
        resources.push_async_callback(amqp.close)
        deps = PersistenceDeps(
            repository=repository,
            publisher=amqp.publisher,
            max_age=settings.max_age,
            refresh_per_tick=settings.refresh_per_tick,
        )
        try:
            await amqp.consume(
                topology.PERSISTENCE_UPSERT,
                GeoUpsertBatch,
                prefetch=UPSERT_PREFETCH,
                handler=partial(on_geo_upsert_batch, deps=deps),
            )
            await amqp.consume(
                topology.PERSISTENCE_RE_RESOLVE,
                ReResolveStale,
                prefetch=1,
                handler=partial(on_re_resolve, deps=deps),
            )
            await amqp.consume(
                topology.PERSISTENCE_KNOWN,
                KnownQuery,
                prefetch=KNOWN_PREFETCH,
                request_handler=partial(on_known, deps=deps),
            )
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
