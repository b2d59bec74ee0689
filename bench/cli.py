"""``python -m bench [--quick] [--json PATH]``: run every scenario once (the soak only when named
with ``--only soak``), print each figure beside its baseline as soon as it is measured, then
delete the run's vhosts and temp files.

Scenarios run one after another (never two at once, so they do not compete for the CPUs), each
in a vhost of its own. A scenario that cannot run marks its figures ERROR and the run goes on;
the exit status is 1 only then. A MISS never changes the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.agent import run_agent_bench
from bench.broker import VhostPool, admin_from_env, broker_version, masked
from bench.drain import bulk_plan, run_drain, single_ip_plan
from bench.ipapi import run_ipapi
from bench.latency import run_latency
from bench.lookup import run_lookup, run_warm
from bench.machine import CpuWatch, describe
from bench.memory import run_memory
from bench.persistence import run_persistence
from bench.postgres import run_bulk_drain_pg, run_persistence_pg
from bench.report import HEADER, Figure, Label, render, write_json
from bench.services import py_spy
from bench.soak import SERVICES as SOAK_SERVICES
from bench.soak import run_soak


@dataclass(frozen=True)
class Sizes:
    single_messages: int
    bulk_messages: int
    upsert_batches: int
    upsert_rounds: int
    memory_ips: int
    ipapi_burst: int
    latency_messages: int
    latency_rate: float
    agent_bans: int = 100_000
    agent_delays: int = 200
    soak_duration: float = 1800.0
    lookup_rounds: int = 500
    warm_rows: int = 1_000_000


FULL = Sizes(50_000, 1000, 100, 3, 200_000, 5_000, 500, 100.0)
QUICK = Sizes(
    *(5_000, 20, 20, 3, 200_000, 2_000, 200, 100.0),
    agent_bans=10_000,
    agent_delays=40,
    soak_duration=30.0,
    lookup_rounds=50,
    warm_rows=20_000,
)

Runner = Callable[[VhostPool, Path], Awaitable[list[Figure]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    keys: tuple[str, ...]
    run: Runner
    opt_in: bool = False  # runs only when named with --only (PostgreSQL; the soak's half hour)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scenarios(sizes: Sizes, tail_flush_interval: float, profile: bool = False) -> list[Scenario]:
    async def single(pool: VhostPool, work: Path) -> list[Figure]:
        plan = single_ip_plan(sizes.single_messages, tail_flush_interval)
        return [await run_drain(plan, pool.new("single"), work / "single", profile=profile)]

    async def bulk(pool: VhostPool, work: Path) -> list[Figure]:
        plan = bulk_plan(sizes.bulk_messages, tail_flush_interval)
        return [await run_drain(plan, pool.new("bulk"), work / "bulk", profile=profile)]

    async def persistence(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_persistence(sizes.upsert_batches, sizes.upsert_rounds, work / "sqlite")

    async def memory(pool: VhostPool, work: Path) -> list[Figure]:
        return [await asyncio.to_thread(run_memory, sizes.memory_ips)]

    async def ipapi(pool: VhostPool, work: Path) -> list[Figure]:
        return [await run_ipapi(sizes.ipapi_burst, pool.new("ipapi"), work / "ipapi")]

    async def latency(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_latency(
            sizes.latency_messages, sizes.latency_rate, pool.new("latency"), work / "latency"
        )

    async def agent(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_agent_bench(
            sizes.agent_bans, sizes.agent_delays, pool.new("agent"), work / "agent"
        )

    async def lookup(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_lookup(sizes.lookup_rounds, pool.new("lookup"), work / "lookup")

    async def warm(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_warm(sizes.warm_rows, pool.new("warm"), work / "warm", free_port())

    async def persistence_pg(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_persistence_pg(sizes.upsert_batches, sizes.upsert_rounds)

    async def bulk_pg(pool: VhostPool, work: Path) -> list[Figure]:
        vhost = pool.new("bulkpg")
        drain = run_bulk_drain_pg(sizes.bulk_messages, vhost, work / "bulk-pg", tail_flush_interval)
        return [await drain]

    async def soak(pool: VhostPool, work: Path) -> list[Figure]:
        return await run_soak(sizes.soak_duration, pool.new("soak"), work / "soak")

    soak_keys = (*(f"soak_rss_{name}" for name in SOAK_SERVICES), "soak_rows")
    return [
        Scenario("single", ("single_ip_drain",), single),
        Scenario("bulk", ("bulk_drain",), bulk),
        Scenario("persistence", ("persistence_upsert", "commits_per_upsert"), persistence),
        Scenario("memory", ("resolver_memory",), memory),
        Scenario("ipapi", ("ipapi_batch_fill",), ipapi),
        Scenario("latency", ("e2e_latency_p50", "e2e_latency_p99", "commits_per_flush"), latency),
        Scenario("agent", ("agent_backfill", "agent_ban_delay_p50", "agent_ban_delay_p99"), agent),
        Scenario("lookup", ("lookup_p50", "lookup_p99", "lookup_concurrent"), lookup),
        Scenario("warm", ("warm_first_served", "warm_all_known", "warm_resolver_rss"), warm),
        Scenario("persistence-pg", ("persistence_upsert_pg",), persistence_pg, opt_in=True),
        Scenario("bulk-pg", ("bulk_drain_pg",), bulk_pg, opt_in=True),
        Scenario("soak", soak_keys, soak, opt_in=True),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmark of bangui-geo against bare baselines, measured in "
        "the same run. "
        "Broker: GEO_BENCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/), management "
        "API: GEO_BENCH_MANAGEMENT_URL (default http://<host>:15672).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI; about a minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--only",
        action="append",
        choices=[
            *("single", "bulk", "persistence", "memory", "ipapi", "latency", "agent"),
            *("lookup", "warm"),
            *("persistence-pg", "bulk-pg", "soak"),  # only when named (PostgreSQL; half an hour)
        ],
        help="run only this scenario (repeatable); soak, persistence-pg and bulk-pg run only "
        "when named here",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds of load in the soak (default 1800, or 30 with --quick)",
    )
    parser.add_argument(
        "--tail-flush-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="timer flush interval during the drains; it closes a burst's tail (default 1)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep databases and service logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to every service of the single and bulk drains and write a flame "
        "graph per service (SCENARIO/SERVICE.profile.svg) into --workdir; the figures of a "
        "profiled run are not comparable",
    )
    args = parser.parse_args(argv)
    if args.profile and args.workdir is None:
        parser.error("--profile writes its flame graphs into --workdir: give one")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be a positive number of seconds")
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy (pip install py-spy, or the [test] extra)")
    return args


WORK_DIRS = (
    *("single", "bulk", "sqlite", "ipapi", "latency", "agent", "lookup", "warm"),
    *("bulk-pg", "soak"),
)


async def run(args: argparse.Namespace, work: Path) -> int:
    started = time.monotonic()
    admin = admin_from_env()
    sizes = QUICK if args.quick else FULL
    if args.duration is not None:
        sizes = replace(sizes, soak_duration=args.duration)
    header = {
        "mode": "quick" if args.quick else "full",
        **describe(broker_version(admin)),
        "broker": masked(admin.amqp_url),
    }
    print("bangui-geo benchmark: project vs bare baseline, same broker, same run")
    for key, value in header.items():
        print(f"  {key:<9} {value}")
    pool = VhostPool(admin)
    print(f"  vhosts    {pool.prefix}* (deleted at the end)")
    print(f"  workdir   {work}")
    print()
    print(HEADER, flush=True)

    chosen = [
        s
        for s in scenarios(sizes, args.tail_flush_interval, args.profile)
        if (s.name in args.only if args.only else not s.opt_in)
    ]
    figures: list[Figure] = []
    try:
        for scenario in chosen:
            watch = CpuWatch()
            try:
                made = await scenario.run(pool, work)
                others, available = watch.report()
                made[0].details.append(
                    f"noise check: other processes used {others:.1f} of the {available:.0f} "
                    f"CPU-seconds available during this scenario (the broker and ours excluded)"
                )
                made[0].metrics["others_cpu_s"] = others
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()
                made = [
                    Figure(key, f"scenario {scenario.name}", "", note=reason[0], failed=True)
                    for key in scenario.keys
                ]
                made[0].details += reason[1:]
            for figure in made:
                figures.append(figure)
                print("\n".join(render(figure)), flush=True)
    finally:
        leftover = pool.delete_all()
    elapsed = time.monotonic() - started
    print()
    misses = [f.key for f in figures if f.label is Label.MISS]
    errors = [f.key for f in figures if f.label is Label.ERROR]
    print(
        f"done in {elapsed:.0f} s (load {os.getloadavg()[0]:.2f}): {len(figures)} figures, "
        f"{sum(f.label is Label.PASS for f in figures)} PASS, {len(misses)} MISS"
        + (f" ({', '.join(misses)})" if misses else "")
        + (f", {len(errors)} ERROR ({', '.join(errors)})" if errors else "")
    )
    if leftover:
        print(f"could not delete vhosts: {', '.join(leftover)}", file=sys.stderr)
    if args.json:
        write_json(args.json, {**header, "wall_s": round(elapsed, 1)}, figures)
        print(f"figures written to {args.json}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bangui-geo-bench-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        for name in WORK_DIRS:
            (work / name).mkdir(parents=True, exist_ok=True)
        try:
            return asyncio.run(run(args, work))
        except KeyboardInterrupt:
            return 130
