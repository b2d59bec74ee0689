"""Figure 6: end-to-end latency from publish to ``geo_cache`` row, and commits per flush.

All three services run, the timer flushing every 0.2 s. Single-IP ``ip.seen`` messages are
published at a steady rate (on an absolute schedule, so a slow confirm does not bunch them), and a
thread polls ``geo_cache`` every 5 ms for new rows (by rowid): a row's latency is when the poll
first saw it minus when its publish was issued, within 5 ms. The baseline is the broker alone: a
bare consumer on a queue bound to the same key gets the same messages, and its latency is the
delivery time minus the same publish time. Commits per flush is persistence's ``commits`` counter
(logged at shutdown) over the resolver's flushes that carried rows.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bangui_geo.testing import ServiceFailed, public_ips
from bench.broker import connect, declare_bare_queue
from bench.report import Figure, Target
from bench.services import Services
from shared import topology

FLUSH_INTERVAL_S = 0.2
ROW_POLL_S = 0.005
LATENCY_QUEUE = "bench.bare.latency"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RowWatcher:
    """A thread noting when each new ``geo_cache`` row is first visible to a reader."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="row-watcher", daemon=True)

    def __enter__(self) -> RowWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        db = sqlite3.connect(self.db_path, timeout=5, check_same_thread=False)
        try:
            last = 0
            while not self._stop.is_set():
                rows = db.execute(
                    "SELECT rowid, ip FROM geo_cache WHERE rowid > ? ORDER BY rowid", (last,)
                ).fetchall()
                now = time.perf_counter()
                for rowid, ip in rows:
                    self.seen.setdefault(ip, now)
                    last = max(last, rowid)
                self._stop.wait(ROW_POLL_S)
        finally:
            db.close()


async def run_latency(messages: int, rate: float, amqp_url: str, workdir: Path) -> list[Figure]:
    p50 = Figure(
        "e2e_latency_p50",
        f"6. publish -> geo_cache row, {messages} single-IP messages at {rate:g}/s, "
        f"timer flush every {FLUSH_INTERVAL_S:g} s",
        "ms",
        baseline_is="bare consumer: publish -> delivery of the same messages",
    )
    p99 = Figure(
        "e2e_latency_p99", "6. the same, 99th percentile", "ms", baseline_is=p50.baseline_is
    )
    per_flush = Figure(
        "commits_per_flush",
        "6b. SQLite commits per resolver flush (persistence commits / flushes with rows)",
        "commits",
        Target("value==", 1),
        baseline_is="one geo.upsert (one commit) per flush of <= 1000 rows",
    )
    services = Services(
        amqp_url,
        workdir / "geo_cache.sqlite3",
        workdir,
        env={"GEO_FLUSH_INTERVAL": str(FLUSH_INTERVAL_S)},
    )
    ips = public_ips(messages, seed=6)
    published: dict[str, float] = {}
    delivered: dict[str, float] = {}
    try:
        for name in ("persistence", "timer", "resolver"):
            services.start(name)
        for name, event in (
            ("persistence", "persistence_ready"),
            ("timer", "timer_leading"),
            ("resolver", "resolver_ready"),
        ):
            await asyncio.to_thread(services.wait_event, name, event)
        connection = await connect(amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await declare_bare_queue(channel, LATENCY_QUEUE)
            queue = await channel.get_queue(LATENCY_QUEUE)

            async def on_message(message: AbstractIncomingMessage) -> None:
                delivered[json.loads(message.body)["ip"]] = time.perf_counter()
                await message.ack()

            await queue.consume(on_message)
            exchange = await channel.get_exchange(topology.EXCHANGE)
            with RowWatcher(services.db_path) as watcher:
                start = time.perf_counter() + 0.1
                pending = []
                for i, ip in enumerate(ips):
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                    body = aio_pika.Message(
                        json.dumps({"ip": ip}).encode(),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    published[ip] = time.perf_counter()
                    pending.append(
                        asyncio.create_task(exchange.publish(body, topology.IP_SEEN, timeout=10))
                    )
                await asyncio.gather(*pending)
                deadline = time.monotonic() + 30
                while len(watcher.seen) < messages or len(delivered) < messages:
                    services.check_running()
                    if time.monotonic() > deadline:
                        raise ServiceFailed(
                            f"after 30 s: {len(watcher.seen)} rows, {len(delivered)} deliveries "
                            f"of {messages}"
                        )
                    await asyncio.sleep(0.05)
                seen = dict(watcher.seen)
        finally:
            await connection.close()
        codes = await asyncio.to_thread(services.stop_all)
    finally:
        services.kill_all()

    project_ms = [1000 * (seen[ip] - published[ip]) for ip in ips]
    bare_ms = [1000 * (delivered[ip] - published[ip]) for ip in ips]
    p50.project, p50.baseline = percentile(project_ms, 0.5), percentile(bare_ms, 0.5)
    p99.project, p99.baseline = percentile(project_ms, 0.99), percentile(bare_ms, 0.99)
    p50.metrics.update(project_min_ms=min(project_ms), project_max_ms=max(project_ms))
    p50.details.append(
        f"project min {min(project_ms):.0f} ms, max {max(project_ms):.0f} ms; rows seen by a "
        f"{ROW_POLL_S * 1000:g} ms poll; a row waits ~half a flush interval on average"
    )

    flushes = [
        e for e in services.events("resolver", "geo_cache_flush_ran") if int(e.get("rows", 0)) > 0
    ]
    counters = services.events("persistence", "persistence_counters")
    if not counters or not flushes:
        raise RuntimeError("missing persistence_counters or geo_cache_flush_ran in the logs")
    commits = int(counters[-1]["commits"])
    batches = sum(int(e.get("batches", 0)) for e in flushes)
    rows = sum(int(e.get("rows", 0)) for e in flushes)
    per_flush.project = commits / len(flushes)
    per_flush.baseline = 1.0
    per_flush.metrics.update(commits=commits, flushes=len(flushes), batches=batches, rows=rows)
    per_flush.details.append(
        f"{commits} commits, {len(flushes)} flushes with rows, {batches} geo.upsert batches, "
        f"{rows / len(flushes):.1f} rows per flush; exit codes {codes}"
    )
    return [p50, p99, per_flush]
