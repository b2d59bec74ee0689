"""PostgreSQL figures (``--only persistence-pg``, ``--only bulk-pg``): ``upsert_many`` against the
bare driver on the same rows, and the bulk pipeline drain with ``GEO_DB_URL``.

Server: ``GEO_BENCH_PG_URL`` (an admin URL, default the local ``postgres`` database); each round
gets a fresh database, dropped afterwards. The upsert rows are the SQLite figure's (``make_rows``:
1000-row batches, each flush in IP order). The baseline is psycopg's own ``executemany`` of the
one-row upsert, one transaction per batch (psycopg pipelines it: one round trip per batch), into
the same table; a ``COPY`` of the same rows into an empty table (no conflict check at all) is
reported beside it as the floor. Sides alternate over the rounds; each keeps its median round.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import psycopg

from bangui_geo.testing import ServiceFailed, event_time, public_ips
from bangui_geo.testing.postgres import fresh_database, read_rows
from bench.broker import prefill
from bench.drain import bulk_plan, flush_triggers, rows_reached
from bench.ips import bulk_bodies
from bench.persistence import BATCH, make_rows, project_round
from bench.report import Figure, Target
from bench.services import Services
from services.persistence.repository import ON_CONFLICT, ROW_COLUMNS
from services.persistence.repository_pg import PostgresGeoRepository, columns, ensure_schema
from shared.messages import GeoRow

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ONE_ROW_UPSERT = (
    f"INSERT INTO geo_cache ({', '.join(ROW_COLUMNS)}) VALUES ("
    + ", ".join("%s" for _ in ROW_COLUMNS)
    + f"){ON_CONFLICT}"
)


def server() -> str:
    return os.environ.get("GEO_BENCH_PG_URL") or DEFAULT_SERVER


async def _schema(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        await ensure_schema(db)


async def bare_round(url: str, batches: list[list[GeoRow]], *, copy: bool) -> float:
    """Seconds for the bare driver: ``executemany`` + commit per batch, or ``COPY`` per batch."""
    await _schema(url)
    params = [list(zip(*columns(b), strict=True)) for b in batches]  # the same text values
    async with await psycopg.AsyncConnection.connect(url) as db:
        started = time.perf_counter()
        for rows in params:
            async with db.cursor() as cursor:
                if copy:
                    statement = f"COPY geo_cache ({', '.join(ROW_COLUMNS)}) FROM STDIN"
                    async with cursor.copy(statement) as sink:
                        for values in rows:
                            await sink.write_row(values)
                else:
                    await cursor.executemany(ONE_ROW_UPSERT, rows)
            await db.commit()
        return time.perf_counter() - started


async def run_persistence_pg(batches: int, rounds: int) -> list[Figure]:
    rate = Figure(
        "persistence_upsert_pg",
        f"3p. upsert {batches} batches of {BATCH} rows into PostgreSQL (fresh database)",
        "rows/s",
        Target("ratio>=", 0.8),
        baseline_is="psycopg executemany of the one-row upsert, same rows, one commit per batch",
    )
    rows = make_rows(batches, salt=3)
    times: dict[str, list[float]] = {"project": [], "bare": [], "copy": []}
    commits: list[int] = []
    for n in range(rounds):
        order = ("bare", "copy", "project") if n % 2 == 0 else ("project", "copy", "bare")
        for side in order:
            with fresh_database(server(), prefix="geo_bench") as url:
                if side == "project":
                    repository = await PostgresGeoRepository.open(url)
                    seconds, made = await project_round(repository, rows)
                    commits.append(made)
                else:
                    seconds = await bare_round(url, rows, copy=side == "copy")
                    if len(read_rows(url)) != batches * BATCH:
                        raise RuntimeError(f"the {side} baseline lost rows")
            times[side].append(seconds)
    total = batches * BATCH
    medians = {side: total / statistics.median(s) for side, s in times.items()}
    rate.project, rate.baseline = medians["project"], medians["bare"]
    rate.details += [
        "rounds (project / executemany / COPY, s): "
        + ", ".join(
            f"{p:.2f}/{b:.2f}/{c:.2f}"
            for p, b, c in zip(times["project"], times["bare"], times["copy"], strict=True)
        )
        + f"; {total:,} rows per round; median round kept",
        f"COPY of the same rows into the empty table (no conflict check): "
        f"{medians['copy']:,.0f} rows/s; ratio to it {rate.project / medians['copy']:.2f}",
        f"commits per geo.upsert message: {statistics.mean(commits) / batches:.2f}",
    ]
    rate.metrics.update(
        copy_baseline=medians["copy"],
        ratio_to_copy=rate.project / medians["copy"],
        commits_per_upsert=statistics.mean(commits) / batches,
    )
    return [rate]


async def run_bulk_drain_pg(messages: int, amqp_url: str, workdir: Path, flush_s: float) -> Figure:
    """The bulk drain of figure 2 with persistence on PostgreSQL: the same clock (resolver's
    ``amqp_connected`` to the commit that completed the table)."""
    plan = bulk_plan(messages, flush_s)
    figure = Figure(
        "bulk_drain_pg",
        f"2p. drain {messages:,} ip.seen messages of 1,000 IPs into geo_cache on PostgreSQL",
        plan.unit,
        plan.target,
    )
    ips = public_ips(plan.ips, plan.salt)
    publish_s = await prefill(amqp_url, bulk_bodies(ips, plan.ips_per_message), bare_queues=[])
    with fresh_database(server(), prefix="geo_bench") as url:
        services = Services(
            amqp_url,
            workdir / "unused.sqlite3",
            workdir,
            env={"GEO_FLUSH_INTERVAL": str(flush_s), "GEO_DB_URL": url},
        )
        codes = await asyncio.to_thread(_drain, services, plan.ips, plan.timeout)
        stored = len(read_rows(url))
    if stored != plan.ips:
        raise RuntimeError(f"geo_cache holds {stored} of {plan.ips} rows")
    started = event_time(services.events("resolver", "amqp_connected")[0])
    commits = services.events("persistence", "geo_upserts_applied")
    finished = rows_reached(commits, plan.ips) or event_time(commits[-1])
    elapsed = finished - started
    figure.project = plan.ips / elapsed
    triggers = flush_triggers(services.events("resolver", "geo_cache_flush_ran"))
    figure.metrics.update(project_s=elapsed, prefill_s=publish_s, upsert_commits=len(commits))
    figure.details += [
        f"project: {plan.ips:,} rows in {elapsed:.2f} s; upsert commits {len(commits)}; "
        f"flushes {dict(triggers)}; pre-fill {publish_s:.1f} s; exit codes {codes}",
    ]
    return figure


def _drain(services: Services, rows: int, timeout: float) -> dict[str, int]:
    """Start persistence and the timer, then the resolver; wait until persistence has
    committed ``rows`` rows (from its log: no polling query competing with the writer)."""
    try:
        services.start_resolver_last()
        deadline = time.monotonic() + timeout
        while rows_reached(services.events("persistence", "geo_upserts_applied"), rows) is None:
            services.check_running()
            if time.monotonic() > deadline:
                raise ServiceFailed(f"not {rows} rows committed within {timeout} s")
            time.sleep(0.25)
        return services.stop_all()
    finally:
        services.kill_all()
