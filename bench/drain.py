"""Figures 1 and 2: how fast the pipeline drains a full ``ip.seen`` queue into ``geo_cache``,
next to a bare aio-pika consumer draining the same messages from the same broker.

One publish pass fills ``geo.resolver.ip_seen`` and the bare queues bound to the same key, so
every side sees identical bodies. The bare consumers drain first; then persistence and the timer
start, then the resolver. The project's clock runs from the resolver's ``amqp_connected`` log
timestamp to the timestamp of the ``geo_upserts_applied`` commit that completed the table (the
table is polled every 20 ms only to know when to stop). Between ``amqp_connected`` and the first
delivery the resolver only declares the existing topology and opens its consumer channel, a few
milliseconds counted against the project. ``resolver_ready`` is no use as a start: it is logged
after the flush and retry consumers register, which waits until the first prefetch of ``ip.seen``
deliveries has been handled (the whole drain, in quick mode).

The resolver flushes early on its own (half the prefetch held, or ``GEO_FLUSH_MAX_DIRTY``), but
the tail of a burst (fewer deliveries than the hold limit) waits for a ``geo.flush``: the timer
runs at ``tail_flush_interval`` (1 s by default; production's 60 s would measure the timer, not
the pipeline). The 90 % point is reported too, which leaves that tail wait out.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bangui_geo.testing import event_time, public_ips
from bench.broker import (
    BARE_QUEUE,
    BATCHED_ACK_EVERY,
    BATCHED_QUEUE,
    BareResult,
    bare_drain,
    prefill,
)
from bench.ips import bulk_bodies, single_bodies
from bench.report import Figure, Target, fmt
from bench.services import Services, read_status, wait_rows


@dataclass(frozen=True)
class DrainPlan:
    key: str
    title: str
    unit: str
    messages: int
    ips_per_message: int
    target: Target
    salt: int
    tail_flush_interval: float
    timeout: float
    batched_baseline: bool  # also drain with a multiple=True-acking bare consumer

    @property
    def ips(self) -> int:
        return self.messages * self.ips_per_message

    def rate(self, seconds: float, messages: int, ips: int) -> float:
        """In the figure's unit: messages/s for single-IP messages, IPs/s for bulk."""
        return (messages if self.ips_per_message == 1 else ips) / seconds


def single_ip_plan(messages: int, tail_flush_interval: float) -> DrainPlan:
    return DrainPlan(
        key="single_ip_drain",
        title=f"1. drain {messages:,} single-IP ip.seen messages into geo_cache",
        unit="msg/s",
        messages=messages,
        ips_per_message=1,
        target=Target("ratio>=", 0.8),
        salt=1,
        tail_flush_interval=tail_flush_interval,
        timeout=max(60.0, messages / 500),
        batched_baseline=True,
    )


def bulk_plan(messages: int, tail_flush_interval: float) -> DrainPlan:
    return DrainPlan(
        key="bulk_drain",
        title=f"2. drain {messages:,} ip.seen messages of 1,000 IPs into geo_cache",
        unit="IPs/s",
        messages=messages,
        ips_per_message=1000,
        target=Target("value>=", 100_000),
        salt=2,
        tail_flush_interval=tail_flush_interval,
        timeout=max(60.0, messages * 1000 / 2000),
        batched_baseline=False,
    )


async def run_drain(
    plan: DrainPlan, amqp_url: str, workdir: Path, *, profile: bool = False
) -> Figure:
    figure = Figure(
        plan.key,
        plan.title,
        plan.unit,
        plan.target,
        baseline_is="bare aio-pika consumer, prefetch 1000, json.loads + ack per message",
    )
    ips = public_ips(plan.ips, plan.salt)
    bodies = (
        single_bodies(ips) if plan.ips_per_message == 1 else bulk_bodies(ips, plan.ips_per_message)
    )
    bare_queues = [BARE_QUEUE, BATCHED_QUEUE] if plan.batched_baseline else [BARE_QUEUE]
    publish_s = await prefill(amqp_url, bodies, bare_queues=bare_queues)
    bare = await bare_drain(amqp_url, BARE_QUEUE, len(bodies), limit_s=plan.timeout)
    batched: BareResult | None = None
    if plan.batched_baseline:
        batched = await bare_drain(
            amqp_url, BATCHED_QUEUE, len(bodies), ack_every=BATCHED_ACK_EVERY, limit_s=plan.timeout
        )
    if bare.ips != plan.ips:
        raise RuntimeError(f"bare consumer saw {bare.ips} IPs, expected {plan.ips}")

    services = Services(
        amqp_url,
        workdir / "geo_cache.sqlite3",
        workdir,
        env={"GEO_FLUSH_INTERVAL": str(plan.tail_flush_interval)},
        profile=profile,
    )
    status, codes = await asyncio.to_thread(drain_with_services, services, plan)
    graphs = await asyncio.to_thread(services.flame_graphs)

    started = event_time(services.events("resolver", "amqp_connected")[0])
    ready = event_time(services.events("resolver", "resolver_ready")[0])
    commits = services.events("persistence", "geo_upserts_applied")
    finished = rows_reached(commits, plan.ips) or event_time(commits[-1])
    t90 = rows_reached(commits, 0.9 * plan.ips) or finished
    elapsed = finished - started
    figure.project = plan.rate(elapsed, plan.messages, plan.ips)
    figure.baseline = plan.rate(bare.seconds, bare.messages, bare.ips)
    triggers = flush_triggers(services.events("resolver", "geo_cache_flush_ran"))
    figure.metrics.update(
        project_s=elapsed,
        project_90pct_s=t90 - started,
        resolver_ready_after_s=ready - started,
        baseline_s=bare.seconds,
        prefill_s=publish_s,
        flushes_size=triggers["size"],
        flushes_timer=triggers["timer"],
        upsert_commits=len(commits),
        resolver_rss_bytes=status.get("VmRSS", 0),
        resolver_peak_rss_bytes=status.get("VmHWM", 0),
    )
    figure.details += [
        f"project: {plan.ips:,} rows in {elapsed:.2f} s from the resolver's amqp_connected to the "
        f"commit completing geo_cache; 90 % after {t90 - started:.2f} s "
        f"(= {plan.rate(t90 - started, int(0.9 * plan.messages), int(0.9 * plan.ips)):,.0f} "
        f"{plan.unit}); resolver_ready logged after {ready - started:.2f} s",
        f"baseline: {bare.messages:,} messages ({bare.ips:,} IPs) in {bare.seconds:.2f} s; "
        f"pre-fill: {len(bodies):,} messages to {1 + len(bare_queues)} queues in {publish_s:.1f} s",
    ]
    if batched is not None:
        rate = plan.rate(batched.seconds, batched.messages, batched.ips)
        figure.metrics.update(batched_baseline=rate, ratio_to_batched=figure.project / rate)
        figure.details.append(
            f"stricter baseline, bare consumer acking multiple=True every {BATCHED_ACK_EVERY}: "
            f"{rate:,.0f} {plan.unit} ({batched.seconds:.2f} s); ratio to it "
            f"{figure.project / rate:.2f}"
        )
    figure.details += [
        f"flushes with rows: {sum(triggers.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(triggers.items()))}); "
        f"upsert commits: {len(commits)}; tail closed by the timer every "
        f"{plan.tail_flush_interval:g} s",
        f"resolver VmRSS {fmt(status.get('VmRSS', 0) / 2**20)} MiB "
        f"(peak {fmt(status.get('VmHWM', 0) / 2**20)} MiB) holding {plan.ips:,} IPs; "
        f"exit codes {codes}",
    ]
    if profile:
        figure.details.append(
            "profiled (py-spy, figures not comparable): "
            + ", ".join(f"{name} {path or 'no flame graph'}" for name, path in graphs.items())
        )
    return figure


def drain_with_services(
    services: Services, plan: DrainPlan
) -> tuple[dict[str, int], dict[str, int]]:
    """Start persistence and the timer, then the resolver on the full queue; wait for every row.

    Returns the resolver's memory status at the end of the drain and the exit codes.
    """
    try:
        services.start_resolver_last()
        wait_rows(services, plan.ips, timeout=plan.timeout)
        status = read_status(services.pid("resolver"))
        return status, services.stop_all()
    finally:
        services.kill_all()


def rows_reached(commits: list[dict[str, Any]], rows: float) -> float | None:
    """When the ``geo_upserts_applied`` commits had written ``rows`` rows in all (epoch)."""
    total = 0
    for event in commits:
        total += int(event.get("rows", 0))
        if total >= rows:
            return event_time(event)
    return None


def flush_triggers(flushes: list[dict[str, Any]]) -> Counter[str]:
    """Flushes that carried rows, by what started them: size (early), timer, or shutdown."""
    kinds: Counter[str] = Counter()
    for event in flushes:
        if int(event.get("rows", 0)) > 0:
            trigger = str(event.get("trigger", ""))
            kinds["timer" if trigger.startswith("flush:") else trigger] += 1
    return kinds
