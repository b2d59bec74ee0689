"""The persistence service, run by its start command, when its database file is deleted in the
middle of a stream of ``geo.upsert`` batches: nothing is acked into the deleted file, so every
batch that reaches persistence after the deletion is in the file at the path."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    drain_queue,
    publish,
    read_rows,
    wait_for_topology,
)
from shared.messages import iso_utc_from_epoch

pytestmark = pytest.mark.integration

BATCHES = 60
ROWS = 50


def batch(n: int) -> dict[str, object]:
    stamp = iso_utc_from_epoch(time.time())
    ips = [f"11.{n}.{i // 256}.{i % 256}" for i in range(ROWS)]
    return {
        "batch_id": f"stream-{n}",
        "rows": [[ip, "resolved", stamp, "US", "United States", None, None, "t"] for ip in ips],
    }


def batch_ips(n: int) -> set[str]:
    return {f"11.{n}.{i // 256}.{i % 256}" for i in range(ROWS)}


def remove_database(db_path: Path) -> None:
    """``rm geo_cache.sqlite3*``: the database, its WAL and its shared-memory file."""
    for path in db_path.parent.glob(db_path.name + "*"):
        path.unlink()


async def test_a_database_deleted_mid_stream_gets_every_later_batch(
    amqp_url: str, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    persistence = service_group.start("persistence")
    try:
        await wait_for_topology(amqp_url)
        published_before_deletion = 0
        for n in range(BATCHES):
            await publish(amqp_url, "geo.upsert", [batch(n)])
            if n == BATCHES // 3:
                await async_poll(
                    lambda: batch_ips(0) <= set(read_rows(db_path)),
                    deadline_s=20,
                    what="the first batches written",
                )
                await asyncio.to_thread(remove_database, db_path)
                published_before_deletion = n + 1
            await asyncio.sleep(0.02)
        later = set().union(*(batch_ips(n) for n in range(published_before_deletion, BATCHES)))
        await async_poll(
            lambda: later <= set(read_rows(db_path)),
            deadline_s=30,
            what="every batch published after the deletion in the file at the path",
        )
        events = [e["event"] for e in persistence.log_events()]
        assert "geo_database_replaced" in events
        assert "geo_database_reopened" in events
        assert await drain_queue(amqp_url, "geo.dead_letter") == []
        assert persistence.running
    finally:
        assert persistence.stop() == 0
