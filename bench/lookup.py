"""Figures 8 and 9: ``geo.lookup`` round trips beside a bare aio-pika request/reply, and the
warm figures of a resolver starting beside a large ``geo_cache``.

8. Persistence and one resolver run; 100 IPs are looked up once (so they are cached), then the
same 100-IP request is sent sequentially with ``GeoClient``. The baseline is the broker alone in
the same run: a bare aio-pika responder on a queue of its own answers each request at once with a
body the size of the real reply, to a requester on direct reply-to. Then 200 requesters, each on
its own connection, ask at the same moment: how many were answered, and how long the last took.

9. A ``geo_cache`` of N rows is written directly, persistence starts on it, then a resolver; one
``ip.seen`` of a known IP waits in the queue. Figures: from the resolver's start to that IP
answered (process start included), then the time to answer all N known IPs (1000 ``ip.seen`` of
1000), and the resolver's RSS after.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bangui_geo.testing import ServiceFailed, public_ips
from bangui_geo.testing.http import scraped
from bench.broker import connect, declare_bare_queue
from bench.latency import percentile
from bench.report import Figure, Target
from bench.services import Services, read_status
from shared import topology
from shared.client import GeoClient
from shared.messages import iso_utc_from_epoch

BARE_QUEUE = "bench.bare.rpc"
REQUEST_IPS = 100
CONCURRENT = 200
METRICS_TIMEOUT_S = 2.0  # a scrape of the resolver's /metrics while it warms


async def _bare_round_trips(amqp_url: str, rounds: int, reply: bytes) -> list[float]:
    connection = await connect(amqp_url)
    try:
        server = await connection.channel()
        await declare_bare_queue(server, BARE_QUEUE)
        queue = await server.get_queue(BARE_QUEUE)

        async def answer(message: AbstractIncomingMessage) -> None:
            await server.default_exchange.publish(
                aio_pika.Message(reply, correlation_id=message.correlation_id),
                message.reply_to or "",
            )
            await message.ack()

        await queue.consume(answer)
        client = await connection.channel()
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        pseudo = await client.get_queue(topology.DIRECT_REPLY_TO, ensure=False)
        await pseudo.consume(replies.put, no_ack=True)
        body = json.dumps({"ips": public_ips(REQUEST_IPS, seed=8)}).encode()
        times = []
        for i in range(rounds):
            started = time.perf_counter()
            await client.default_exchange.publish(
                aio_pika.Message(body, correlation_id=str(i), reply_to=topology.DIRECT_REPLY_TO),
                BARE_QUEUE,
            )
            while (await asyncio.wait_for(replies.get(), 10)).correlation_id != str(i):
                pass
            times.append(1000 * (time.perf_counter() - started))
        return times
    finally:
        await connection.close()


async def run_lookup(rounds: int, amqp_url: str, workdir: Path) -> list[Figure]:
    p50 = Figure(
        "lookup_p50",
        f"8. geo.lookup of {REQUEST_IPS} cached IPs, {rounds} sequential requests (GeoClient)",
        "ms",
        Target("value<=", 0),  # replaced below: within 2x of the bare round trip
        baseline_is="bare aio-pika request/reply (direct reply-to), same reply size",
    )
    p99 = Figure("lookup_p99", "8. the same, 99th percentile", "ms", baseline_is=p50.baseline_is)
    crowd = Figure(
        "lookup_concurrent",
        f"8b. {CONCURRENT} requesters at once, each on its own connection: answered",
        "requests",
        Target("value==", CONCURRENT),
        baseline_is="every request answered",
    )
    services = Services(amqp_url, workdir / "geo_cache.sqlite3", workdir)
    ips = public_ips(REQUEST_IPS, seed=8)
    try:
        for name in ("persistence", "resolver"):
            services.start(name)
        await asyncio.to_thread(services.wait_event, "persistence", "persistence_ready")
        await asyncio.to_thread(services.wait_event, "resolver", "resolver_ready")
        async with GeoClient.connect(amqp_url) as geo:
            first = await geo.lookup(ips, timeout=10)
            reply = json.dumps({"rows": [list(r) for r in first]}).encode()
            project = []
            for _ in range(rounds):
                started = time.perf_counter()
                await geo.lookup(ips, timeout=10)
                project.append(1000 * (time.perf_counter() - started))
        bare = await _bare_round_trips(amqp_url, rounds, reply)

        async def one() -> float:
            async with GeoClient.connect(amqp_url) as geo:
                started = time.perf_counter()
                rows = await geo.lookup(ips, timeout=30)
                if len(rows) != REQUEST_IPS:
                    raise ServiceFailed(f"{len(rows)} rows for {REQUEST_IPS} IPs")
                return 1000 * (time.perf_counter() - started)

        crowd_ms = await asyncio.gather(*(one() for _ in range(CONCURRENT)))
        services.check_running()
        codes = await asyncio.to_thread(services.stop_all)
    finally:
        services.kill_all()
    p50.project, p50.baseline = percentile(project, 0.5), percentile(bare, 0.5)
    p50.target = Target("value<=", 2 * p50.baseline)
    p99.project, p99.baseline = percentile(project, 0.99), percentile(bare, 0.99)
    p50.details.append(
        f"target: within 2x of the bare p50 ({2 * p50.baseline:.2f} ms); reply {len(reply)} B"
    )
    crowd.project, crowd.baseline = float(len(crowd_ms)), float(CONCURRENT)
    crowd.metrics.update(p50_ms=percentile(crowd_ms, 0.5), max_ms=max(crowd_ms))
    crowd.details.append(
        f"answer time p50 {percentile(crowd_ms, 0.5):.0f} ms, slowest {max(crowd_ms):.0f} ms "
        f"(connections opened before the clock starts); exit codes {codes}"
    )
    return [p50, p99, crowd]


def write_table(db_path: Path, ips: list[str]) -> None:
    """A bangui-geo table of ``ips``, all resolved, written directly (persistence migrates
    nothing and creates the rest of its schema at start)."""
    stamp = iso_utc_from_epoch(time.time() - 3600)
    with closing(sqlite3.connect(db_path)) as db:
        db.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL, resolution TEXT, provider TEXT)"
        )
        db.executemany(
            "INSERT INTO geo_cache VALUES (?, 'US', 'United States', NULL, NULL, ?,"
            " 'resolved', 'embedded')",
            ((ip, stamp) for ip in sorted(ips)),
        )
        db.commit()


async def run_warm(rows: int, amqp_url: str, workdir: Path, port: int) -> list[Figure]:
    first = Figure(
        "warm_first_served",
        f"9. resolver start -> first known ip.seen answered, geo_cache of {rows:,} rows",
        "ms",
        baseline_is="no warm-up: misses are asked of persistence (geo.known)",
    )
    whole = Figure(
        "warm_all_known",
        f"9b. all {rows:,} known IPs answered from geo_cache (1000-IP ip.seen), 0 lookups",
        "IPs/s",
    )
    memory = Figure(
        "warm_resolver_rss", "9c. resolver RSS after answering them (GEO_CACHE_MAX_ENTRIES)", "MiB"
    )
    ips = public_ips(rows, seed=9)
    db_path = workdir / "geo_cache.sqlite3"
    await asyncio.to_thread(write_table, db_path, ips)
    services = Services(amqp_url, db_path, workdir, env={"GEO_FLUSH_INTERVAL": "1"})
    try:
        services.start("persistence")
        await asyncio.to_thread(services.wait_event, "persistence", "persistence_ready")
        connection = await connect(amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.EXCHANGE)
            await exchange.publish(
                aio_pika.Message(json.dumps({"ip": ips[0]}).encode()), topology.IP_SEEN
            )
            started = time.perf_counter()
            services.start("resolver", GEO_METRICS_PORT=str(port))
            while (scraped(port, "geo_known_hits_total", timeout=METRICS_TIMEOUT_S) or 0) < 1:
                services.check_running()
                await asyncio.sleep(0.005)
            first.project = 1000 * (time.perf_counter() - started)
            bodies = [json.dumps({"ips": ips[i : i + 1000]}).encode() for i in range(0, rows, 1000)]
            started = time.perf_counter()
            for i in range(0, len(bodies), 100):
                await asyncio.gather(
                    *(
                        exchange.publish(aio_pika.Message(b), topology.IP_SEEN)
                        for b in bodies[i : i + 100]
                    )
                )
            while (scraped(port, "geo_known_hits_total", timeout=METRICS_TIMEOUT_S) or 0) < rows:
                services.check_running()
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            lookups = scraped(port, "geo_lookups_total", timeout=METRICS_TIMEOUT_S)
            rss = read_status(services.pid("resolver")).get("VmRSS", 0)
        finally:
            await connection.close()
        codes = await asyncio.to_thread(services.stop_all)
    finally:
        services.kill_all()
    whole.project = rows / elapsed
    whole.details.append(
        f"{elapsed:.1f} s for {rows:,} IPs; provider lookups {lookups:.0f}; exit codes {codes}"
    )
    memory.project = rss / 2**20
    return [first, whole, memory]
