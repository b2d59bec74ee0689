"""The pipeline with ``geo_cache`` in PostgreSQL (``GEO_DB_URL``) where it differs from SQLite:
the legacy table's migration, what only a server does (going away mid-run) and refusing a wrong
URL at start. The tests that only look at rows run on both stores (``any_store``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceGroup,
    async_poll,
    drain_queue,
    events,
    publish,
    service_env,
    wait_for_topology,
)
from bangui_geo.testing.postgres import TRUST_IGNORED_PASSWORD as PG_PASSWORD
from bangui_geo.testing.postgres import admin_url

pytestmark = pytest.mark.integration


async def test_re_resolve_round_trip_on_postgres(pg_service_group: ServiceGroup) -> None:
    pg_url = pg_service_group.env["GEO_DB_URL"]
    with psycopg.connect(pg_url) as db:  # the original BanGUI's six columns
        db.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"
        )
        for ip in ("8.8.8.8", "1.1.1.1", "10.0.0.1"):
            db.execute(
                "INSERT INTO geo_cache (ip, cached_at) VALUES (%s, '2020-01-01T00:00:00.000000Z')",
                (ip,),
            )
    pg_service_group.start("persistence")
    await wait_for_topology(pg_service_group.amqp_url)
    await async_poll(
        lambda: events(pg_service_group.processes["persistence"], "persistence_ready"),
        deadline_s=15,
        what="persistence ready (schema migrated)",
    )
    with psycopg.connect(pg_url) as db:
        db.execute(
            "INSERT INTO geo_cache (ip, country_code, country_name, asn, org, cached_at,"
            " resolution, provider)"
            " VALUES ('9.9.9.9', NULL, NULL, NULL, NULL,"
            " '2020-01-01T00:00:00.000000Z', 'failed', 'ip-api'),"
            " ('4.4.4.4', NULL, NULL, NULL, NULL, '2020-01-01T00:00:00.000000Z', 'rejected',"
            " 'ip-api')"
        )
    pg_service_group.start("resolver")
    pg_service_group.start("timer", GEO_RE_RESOLVE_INTERVAL="1.0")

    async def retried() -> bool:
        rows = pg_service_group.rows()
        return all(rows[ip][0] for ip in ("8.8.8.8", "1.1.1.1", "9.9.9.9"))

    await async_poll(retried, deadline_s=20, what="unresolved rows resolved by re-resolve")
    rows = pg_service_group.rows()
    assert rows["8.8.8.8"][:2] == ("US", "United States")
    assert rows["10.0.0.1"][0] is None
    assert rows["4.4.4.4"][4:6] == ("2020-01-01T00:00:00.000000Z", "rejected")
    ran = events(pg_service_group.processes["persistence"], "geo_re_resolve_ran")
    assert ran[0]["retried"] == 3
    assert pg_service_group.stop_all() == {"persistence": 0, "resolver": 0, "timer": 0}


async def test_a_database_gone_mid_run_is_waited_for_and_nothing_is_lost(
    pg_service_group: ServiceGroup, pg_url: str
) -> None:
    persistence = pg_service_group.start("persistence")
    pg_service_group.start("resolver")
    pg_service_group.start("timer")
    await wait_for_topology(pg_service_group.amqp_url)
    await publish(pg_service_group.amqp_url, "ip.seen", [{"ip": "8.8.8.8"}])
    await async_poll(lambda: "8.8.8.8" in pg_service_group.rows(), deadline_s=15, what="first row")

    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        # The server goes away for this database: its connections end, new ones are refused.
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        try:
            await publish(pg_service_group.amqp_url, "ip.seen", [{"ips": ["1.1.1.1", "9.9.9.9"]}])
            await async_poll(
                lambda: len(events(persistence, "message_requeued")) >= 2,
                deadline_s=20,
                what="persistence to requeue the batch it could not write, more than once",
            )
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    await async_poll(
        lambda: {"1.1.1.1", "9.9.9.9"} <= set(pg_service_group.rows()),
        deadline_s=20,
        what="rows written once the database is back",
    )
    requeued = events(persistence, "message_requeued")
    assert all("geo_cache" in e["reason"] for e in requeued), requeued
    assert events(persistence, "postgres_connection_restored")
    assert await drain_queue(pg_service_group.amqp_url, "geo.dead_letter") == []
    assert persistence.running
    assert pg_service_group.stop_all() == {"persistence": 0, "resolver": 0, "timer": 0}


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
    env = service_env(amqp_url, tmp_path / "unused.sqlite3", GEO_DB_URL=url.format(pw=PG_PASSWORD))
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
    assert PG_PASSWORD not in line
    assert "***" in line
