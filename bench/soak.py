"""The soak: steady ``ip.seen`` load through the real services for a long while, each service's
RSS sampled from /proc, and the figure per service is how fast its RSS grows (MB per hour, the
least-squares slope over the samples after a warm-up). A leak of a few kB per tick or per
message shows here long before it shows in production.

The load mixes new and repeated IPs: a third of the messages carry an IP never published
before, the rest one of the recent IPs. The resolver's cache is bounded at half the new IPs of
the warm-up, so it is full (and evicting) before the measured part begins: a flat resolver then
means a flat steady state, not a cache still filling. A second timer runs as a standby, whose
lock checks leaked as the leader's did. At the end the rows stored must equal the IPs published.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import AMQPError

from bangui_geo.testing import iter_public_ips
from bench.broker import connect
from bench.report import Figure, Target
from bench.services import Services, read_status, wait_rows
from shared import topology
from shared.amqp import declare_topology

RATE = 300.0  # ip.seen messages per second
NEW_SHARE = 1 / 3  # of the messages carry an IP not published before
PUBLISH_TICK_S = 0.1  # messages go out in groups every tick, on an absolute schedule
FLUSH_INTERVAL_S = "1"
RE_RESOLVE_INTERVAL_S = "60"  # the re-resolve path runs too, as in production (at 600 s)
WARM_UP_MAX_S = 300.0
SAMPLE_EVERY_MAX_S = 10.0
RECONNECT_LIMIT_S = 120.0
MAX_GROUPS_IN_FLIGHT = 20
# Growth a service may show per hour and still count as flat (allocator noise, log buffers).
FLAT_MB_PER_HOUR = 2.0
SERVICES = ("resolver", "persistence", "timer", "standby")
TITLES = {"standby": "standby timer"}


def warm_up_s(duration: float) -> float:
    return min(WARM_UP_MAX_S, duration / 4)


def sample_every_s(duration: float) -> float:
    """At most every 10 s, and at least ~30 samples in any run."""
    return max(0.5, min(SAMPLE_EVERY_MAX_S, duration / 30))


def growth_per_hour(samples: Sequence[tuple[float, int]], after: float) -> float | None:
    """Least-squares slope of RSS (bytes) over time (s) for samples at or after ``after``, in
    MB per hour; None with fewer than three samples."""
    points = [(t, rss) for t, rss in samples if t >= after]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (r - mean_r) for t, r in points) / spread  # bytes per second
    return slope * 3600 / 1e6


@dataclass
class MixedIps:
    """The IP of each message: a new one with probability ``new_share``, else a recent one."""

    window: int
    new_share: float = NEW_SHARE
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    published: list[str] = field(default_factory=list)
    _fresh: Iterator[str] = field(default_factory=lambda: iter_public_ips(10**9, seed=11))

    def next(self) -> str:
        if not self.published or self.rng.random() < self.new_share:
            ip = next(self._fresh)
            self.published.append(ip)
            return ip
        back = self.rng.randrange(min(self.window, len(self.published)))
        return self.published[-1 - back]


@dataclass
class RssSamples:
    """RSS of each service over time (seconds since the load started)."""

    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    csv: Path | None = None  # each sample also appended here, so a long run leaves its data

    def take(self, elapsed: float, pids: dict[str, int]) -> None:
        for name, pid in pids.items():
            rss = read_status(pid).get("VmRSS")
            if rss is not None:
                self.series.setdefault(name, []).append((elapsed, rss))
                if self.csv is not None:
                    with self.csv.open("a") as out:
                        out.write(f"{elapsed:.1f},{name},{rss}\n")


async def publish_steadily(amqp_url: str, ips: MixedIps, duration: float, on_tick: Tick) -> int:
    """``RATE`` single-IP ``ip.seen`` a second for ``duration`` seconds, with confirms; returns
    how many were published. ``on_tick`` runs between groups (the RSS sampling).

    Half an hour on a shared broker may see it restarted: the connection is robust, and a group
    that was not confirmed is published again once it is back (the services reconnect on their
    own), so the rows still match the IPs and the interruption is counted, not fatal.
    """
    connection = await aio_pika.connect_robust(amqp_url, timeout=10)
    published = 0
    per_tick = round(RATE * PUBLISH_TICK_S)
    in_flight: deque[asyncio.Task[None]] = deque()
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.EXCHANGE)
        started = time.monotonic()
        tick = 0
        # Bounded by the clock, not a count: a machine too busy for the rate gets less load
        # (the achieved rate is reported), never a longer run or a burst to catch up. Groups
        # overlap (confirms arrive while the next group goes out), up to MAX_GROUPS_IN_FLIGHT.
        while (elapsed := time.monotonic() - started) < duration:
            on_tick(elapsed)
            bodies = [json.dumps({"ip": ips.next()}).encode() for _ in range(per_tick)]
            in_flight.append(asyncio.create_task(publish_group(exchange, bodies, on_tick)))
            published += per_tick
            while in_flight and (in_flight[0].done() or len(in_flight) > MAX_GROUPS_IN_FLIGHT):
                await in_flight.popleft()
            tick = max(tick + 1, int((time.monotonic() - started) / PUBLISH_TICK_S))
            await asyncio.sleep(max(0.0, started + tick * PUBLISH_TICK_S - time.monotonic()))
        while in_flight:
            await in_flight.popleft()
        on_tick.final(time.monotonic() - started)
    finally:
        for task in in_flight:
            task.cancel()
        await connection.close()
    return published


async def publish_group(exchange: AbstractExchange, bodies: list[bytes], on_tick: Tick) -> None:
    """Publish ``bodies`` with confirms, again after a lost connection, for up to two minutes."""
    give_up = time.monotonic() + RECONNECT_LIMIT_S
    while True:
        try:
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        topology.IP_SEEN,
                        timeout=30,
                    )
                    for body in bodies
                )
            )
            return
        except (AMQPError, ConnectionError, TimeoutError, RuntimeError):
            if time.monotonic() > give_up:
                raise
            on_tick.interruptions += 1
            await asyncio.sleep(1.0)


class Tick:
    """Samples RSS whenever ``every`` seconds have passed; also checks the services still run."""

    def __init__(self, services: Services, pids: dict[str, int], every: float) -> None:
        self.services = services
        self.pids = pids
        self.every = every
        self.samples = RssSamples(csv=services.log_dir / "rss.csv")
        self.interruptions = 0  # publishes retried after the broker went away
        self.elapsed = 0.0
        self._next = 0.0

    def __call__(self, elapsed: float) -> None:
        if elapsed >= self._next:
            self.services.check_running()
            self.samples.take(elapsed, self.pids)
            self._next = elapsed + self.every

    def final(self, elapsed: float) -> None:
        self.samples.take(elapsed, self.pids)
        self.elapsed = elapsed


def error_lines(services: Services) -> int:
    return sum(
        1
        for name in services.processes
        for event in services.events(name)
        if event.get("level") in ("error", "critical")
    )


def distinct_rows(db_path: Path) -> int:
    with closing(sqlite3.connect(db_path, timeout=10)) as db:
        return int(db.execute("SELECT count(*) FROM geo_cache").fetchone()[0])


async def run_soak(duration: float, amqp_url: str, workdir: Path) -> list[Figure]:
    warm_up = warm_up_s(duration)
    every = sample_every_s(duration)
    new_in_warm_up = RATE * NEW_SHARE * warm_up
    cache_bound = max(100, int(new_in_warm_up / 2))
    services = Services(
        amqp_url,
        workdir / "geo_cache.sqlite3",
        workdir,
        env={
            "GEO_FLUSH_INTERVAL": FLUSH_INTERVAL_S,
            "GEO_RE_RESOLVE_INTERVAL": RE_RESOLVE_INTERVAL_S,
            "GEO_CACHE_MAX_ENTRIES": str(cache_bound),
        },
    )
    ips = MixedIps(window=cache_bound)
    connection = await connect(amqp_url)  # the topology first, so no early ip.seen is unroutable
    try:
        await declare_topology(await connection.channel())
    finally:
        await connection.close()
    try:
        services.start("persistence")
        services.start("timer")
        await asyncio.to_thread(services.wait_event, "timer", "timer_leading")
        standby = services.start("timer", "standby")
        await asyncio.to_thread(services.wait_event, "standby", "timer_standby_waiting")
        services.start("resolver")
        for name, event in (("persistence", "persistence_ready"), ("resolver", "resolver_ready")):
            await asyncio.to_thread(services.wait_event, name, event)
        pids = {name: services.pid(name) for name in SERVICES}
        tick = Tick(services, pids, every)
        published = await publish_steadily(amqp_url, ips, duration, tick)
        expected = len(ips.published)
        await asyncio.to_thread(wait_rows, services, expected, timeout=120)
        rows = distinct_rows(services.db_path)
        errors = error_lines(services)
        codes = {"standby": standby.stop()}
        codes.update(await asyncio.to_thread(services.stop_all))
    finally:
        services.kill_all()
    return figures(
        tick.samples,
        warm_up,
        duration,
        published,
        expected,
        rows,
        errors,
        codes,
        tick.interruptions,
        published / tick.elapsed if tick.elapsed else 0.0,
    )


def figures(
    samples: RssSamples,
    warm_up: float,
    duration: float,
    published: int,
    expected: int,
    rows: int,
    errors: int,
    codes: dict[str, int],
    interruptions: int,
    rate: float,
) -> list[Figure]:
    out = []
    for name in SERVICES:
        series = samples.series.get(name, [])
        measured = [rss for t, rss in series if t >= warm_up]
        figure = Figure(
            f"soak_rss_{name}",
            f"soak: {TITLES.get(name, name)} RSS growth over {duration:g} s of {RATE:g} ip.seen/s "
            f"(slope after a {warm_up:g} s warm-up)",
            "MB/h",
            Target("value<=", FLAT_MB_PER_HOUR),
        )
        figure.project = growth_per_hour(series, warm_up)
        if measured:
            first, last, peak = measured[0] / 1e6, measured[-1] / 1e6, max(measured) / 1e6
            figure.details.append(
                f"RSS {first:.1f} MB after warm-up -> {last:.1f} MB at the end "
                f"(peak {peak:.1f} MB), {len(measured)} samples"
            )
            figure.metrics.update(
                rss_after_warm_up_mb=first, rss_end_mb=last, rss_peak_mb=peak, samples=len(series)
            )
        if figure.project is None:
            figure.note = f"fewer than 3 samples after the warm-up ({len(series)} in all)"
        out.append(figure)
    stored = Figure(
        "soak_rows",
        "soak: geo_cache rows / distinct IPs published",
        "rows",
        Target("ratio>=", 1.0),
        project=float(rows),
        baseline=float(expected),
        baseline_is="distinct IPs published",
    )
    stored.details.append(
        f"{published} messages published ({rate:.0f}/s of the {RATE:g}/s asked), "
        f"{expected} distinct IPs, {rows} rows; "
        f"{errors} error lines in the service logs; exit codes {codes}"
    )
    if interruptions:
        stored.details.append(
            f"the broker went away during the run: {interruptions} publish groups retried"
        )
    stored.metrics.update(
        published=published,
        distinct_ips=expected,
        rows=rows,
        errors=errors,
        interruptions=interruptions,
        rate=rate,
    )
    out.append(stored)
    return out
