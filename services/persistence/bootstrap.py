"""Composition root of persistence: opens the SQLite file and the broker, wires the two queues."""

from __future__ import annotations

import asyncio
from functools import partial

import structlog

from services.persistence.handlers import PersistenceDeps, on_geo_upsert_batch, on_re_resolve
from services.persistence.repository import SqliteGeoRepository
from shared import topology
from shared.amqp import Amqp
from shared.messages import GeoUpsertBatch, ReResolveStale
from shared.settings import Settings

UPSERT_PREFETCH = 8


async def run(settings: Settings, stop: asyncio.Event) -> None:
    log = structlog.get_logger("persistence")
    repository = await SqliteGeoRepository.open(settings.db_path)
    try:
        amqp = await Amqp.open(settings, service="persistence")
    except BaseException:
        await repository.close()
        raise
    deps = PersistenceDeps(repository=repository, publisher=amqp.publisher)
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
        log.info("persistence_ready", db_path=str(settings.db_path))
        await stop.wait()
    finally:
        await amqp.stop_consuming(settings.drain_timeout)
        await amqp.close()
        await repository.close()
        log.info(
            "persistence_counters",
            batches=deps.state.batches,
            rows=deps.state.rows,
            commits=repository.commits,
            retries_requested=deps.state.retries_requested,
        )
