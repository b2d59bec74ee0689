"""The pipeline, fault and scale-out tests with ``geo_cache`` in PostgreSQL (``GEO_DB_URL``): the
same test bodies as on SQLite where they only look at rows, plus what only a server does: going
away mid-run, and refusing a wrong URL at start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.broker import BrokerAdmin
from tests.integration import test_pipeline
from tests.integration.support import (
    REPO_ROOT,
    async_poll,
    drain_queue,
    events,
    publish,
    service_env,
    wait_for_topology,
)
from tests.integration.test_pipeline import Pipeline
from tests.integration.test_scale_out import FlushTap, Replicas
from tests.integration.test_scale_out import flush_tap as flush_tap  # the fixture, re-exported
from tests.integration.test_scale_out import (
    test_two_of_each_service_share_the_work_and_the_standby_writer_takes_over as run_scale_out,
)
from tests.postgres import admin_url, read_rows

pytestmark = pytest.mark.integration

PASSWORD = "hunter2-geo"  # trust auth ignores it; it must never show in a log or an error


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


class PgPipeline(Pipeline):
    def __init__(self, amqp_url: str, tmp_path: Path, pg_url: str) -> None:
        super().__init__(amqp_url, tmp_path)
        self.pg_url = with_password(pg_url)

    def start(self, name: str, **env: str) -> Any:
        return super().start(name, **{"GEO_DB_URL": self.pg_url, **env})

    def rows(self) -> dict[str, tuple[Any, ...]]:
        return read_rows(self.pg_url)


class PgReplicas(Replicas):
    def __init__(self, amqp_url: str, tmp_path: Path, pg_url: str) -> None:
        super().__init__(amqp_url, tmp_path, GEO_DB_URL=with_password(pg_url))
        self.pg_url = pg_url

    def rows(self) -> dict[str, tuple[Any, ...]]:
        return read_rows(self.pg_url)


@pytest.fixture
def pipeline(amqp_url: str, tmp_path: Path, pg_url: str) -> Iterator[PgPipeline]:
    pipe = PgPipeline(amqp_url, tmp_path, pg_url)
    yield pipe
    for process in pipe.processes.values():
        if process.running:
            process.kill()
    for process in pipe.processes.values():
        assert PASSWORD not in process.log_path.read_text(errors="replace")
    assert not pipe.db_path.exists(), "a SQLite file was written beside GEO_DB_URL"


async def test_mixed_burst_becomes_exact_rows_on_postgres(pipeline: PgPipeline) -> None:
    await test_pipeline.test_mixed_burst_becomes_exact_rows_and_malformed_is_dead_lettered(pipeline)
    ready = events(pipeline.processes["persistence"], "persistence_ready")
    assert ready[0]["store"] == "postgres"
    assert ready[0]["db"].startswith("postgresql://postgres:***@")


async def test_killed_resolver_loses_nothing_on_postgres(pipeline: PgPipeline) -> None:
    await test_pipeline.test_killed_resolver_loses_nothing(pipeline)


async def test_re_resolve_round_trip_on_postgres(pipeline: PgPipeline) -> None:
    with psycopg.connect(pipeline.pg_url) as db:  # the original BanGUI's six columns
        db.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"
        )
        for ip in ("8.8.8.8", "1.1.1.1", "10.0.0.1"):
            db.execute(
                "INSERT INTO geo_cache (ip, cached_at) VALUES (%s, '2020-01-01T00:00:00.000000Z')",
                (ip,),
            )
    pipeline.start("persistence")
    await wait_for_topology(pipeline.amqp_url)
    await async_poll(
        lambda: events(pipeline.processes["persistence"], "persistence_ready"),
        deadline_s=15,
        what="persistence ready (schema migrated)",
    )
    with psycopg.connect(pipeline.pg_url) as db:
        db.execute(
            "INSERT INTO geo_cache (ip, country_code, country_name, asn, org, cached_at,"
            " resolution, provider)"
            " VALUES ('9.9.9.9', NULL, NULL, NULL, NULL,"
            " '2020-01-01T00:00:00.000000Z', 'failed', 'ip-api'),"
            " ('4.4.4.4', NULL, NULL, NULL, NULL, '2020-01-01T00:00:00.000000Z', 'rejected',"
            " 'ip-api')"
        )
    pipeline.start("resolver")
    pipeline.start("timer", GEO_RE_RESOLVE_INTERVAL="1.0")

    async def retried() -> bool:
        rows = pipeline.rows()
        return all(rows[ip][0] for ip in ("8.8.8.8", "1.1.1.1", "9.9.9.9"))

    await async_poll(retried, deadline_s=20, what="unresolved rows resolved by re-resolve")
    rows = pipeline.rows()
    assert rows["8.8.8.8"][:2] == ("US", "United States")
    assert rows["10.0.0.1"][0] is None
    assert rows["4.4.4.4"][4:6] == ("2020-01-01T00:00:00.000000Z", "rejected")
    ran = events(pipeline.processes["persistence"], "geo_re_resolve_ran")
    assert ran[0]["retried"] == 3
    assert pipeline.stop_all() == {"persistence": 0, "resolver": 0, "timer": 0}


async def test_a_database_gone_mid_run_is_waited_for_and_nothing_is_lost(
    pipeline: PgPipeline, pg_url: str
) -> None:
    persistence = pipeline.start("persistence")
    pipeline.start("resolver")
    pipeline.start("timer")
    await wait_for_topology(pipeline.amqp_url)
    await publish(pipeline.amqp_url, "ip.seen", [{"ip": "8.8.8.8"}])
    await async_poll(lambda: "8.8.8.8" in pipeline.rows(), deadline_s=15, what="first row")

    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        # The server goes away for this database: its connections end, new ones are refused.
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        try:
            await publish(pipeline.amqp_url, "ip.seen", [{"ips": ["1.1.1.1", "9.9.9.9"]}])
            await async_poll(
                lambda: len(events(persistence, "message_requeued")) >= 2,
                deadline_s=20,
                what="persistence to requeue the batch it could not write, more than once",
            )
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    await async_poll(
        lambda: {"1.1.1.1", "9.9.9.9"} <= set(pipeline.rows()),
        deadline_s=20,
        what="rows written once the database is back",
    )
    requeued = events(persistence, "message_requeued")
    assert all("geo_cache" in e["reason"] for e in requeued), requeued
    assert events(persistence, "postgres_connection_restored")
    assert await drain_queue(pipeline.amqp_url, "geo.dead_letter") == []
    assert persistence.running
    assert pipeline.stop_all() == {"persistence": 0, "resolver": 0, "timer": 0}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql://postgres:{pw}@127.0.0.1/geo", "must start with postgresql://"),
        ("postgresql://postgres:{pw}@127.0.0.1:5432/geo_no_such_db", "does not exist"),
        ("postgresql://postgres:{pw}@127.0.0.1:1/geo", "Connection refused"),
        ("postgresql://postgres:{pw}@127.0.0.1:5432/", "names no database"),
        ("postgresql://postgres@127.0.0.1/geo?sslmode=nope&password={pw}", "sslmode"),
    ],
)
def test_a_bad_database_url_stops_persistence_with_one_line(
    amqp_url: str, tmp_path: Path, url: str, reason: str
) -> None:
    env = service_env(amqp_url, tmp_path / "unused.sqlite3", GEO_DB_URL=url.format(pw=PASSWORD))
    done = subprocess.run(
        [sys.executable, "-m", "services.persistence"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("persistence: invalid setting GEO_DB_URL: "), line
    assert reason in line
    assert PASSWORD not in line
    assert "***" in line


async def test_two_of_each_service_and_a_killed_writer_on_postgres(
    amqp_url: str, tmp_path: Path, pg_url: str, flush_tap: FlushTap, broker_admin: BrokerAdmin
) -> None:
    group = PgReplicas(amqp_url, tmp_path, pg_url)
    try:
        await run_scale_out(group, flush_tap, broker_admin)
    finally:
        for process in group.processes.values():
            if process.running:
                process.kill()
