"""What only the PostgreSQL repository faces: other writers holding locks (a deadlock is
requeued, not dead-lettered), a server that drops the connection, and several instances
creating the schema at once."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from bangui_geo.testing.postgres import admin_url, read_rows
from bangui_geo.testing.rows import row
from services.persistence.repository_pg import PostgresGeoRepository
from shared.errors import Transient

pytestmark = pytest.mark.integration


async def waiting_for_a_lock(url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as probe:
        cursor = await probe.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        found = await cursor.fetchone()
    return bool(found and found[0])


async def test_a_deadlock_with_another_writer_is_transient_and_leaves_the_connection_usable(
    pg_url: str,
) -> None:
    repo = await PostgresGeoRepository.open(pg_url)
    other = await psycopg.AsyncConnection.connect(pg_url)
    try:
        await repo.upsert_many([row("11.0.0.1", minutes=0), row("11.0.0.2", minutes=0)])
        # The other writer locks the rows in the opposite order; its long deadlock_timeout
        # makes our statement the one PostgreSQL aborts.
        await other.execute("SET deadlock_timeout = '20s'")
        await other.execute("UPDATE geo_cache SET org = 'other' WHERE ip = '11.0.0.2'")
        upsert = asyncio.create_task(
            repo.upsert_many([row("11.0.0.1", "DE", minutes=5), row("11.0.0.2", "DE", minutes=5)])
        )
        while not await waiting_for_a_lock(pg_url):
            assert not upsert.done(), upsert
            await asyncio.sleep(0.05)
        await other.execute("UPDATE geo_cache SET org = 'other' WHERE ip = '11.0.0.1'")
        await other.commit()
        with pytest.raises(Transient, match="deadlock detected"):
            await upsert
        assert repo.commits == 1
        assert await repo.upsert_many([row("11.0.0.1", "DE", minutes=5)]) == 1  # requeued
        assert read_rows(pg_url)["11.0.0.1"][0] == "DE"
    finally:
        await other.close()
        await repo.close()


async def test_a_dropped_connection_is_transient_then_reopened(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "postgres:pw-not-shown@", 1)
    repo = await PostgresGeoRepository.open(url)
    try:
        await repo.upsert_many([row("11.0.0.1")])
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_url.rsplit("/", 1)[1],),
            )
        with pytest.raises(Transient) as lost:
            await repo.upsert_many([row("11.0.0.2")])
        assert "pw-not-shown" not in str(lost.value)
        assert "postgres:***@" in str(lost.value)
        assert await repo.upsert_many([row("11.0.0.2")]) == 1  # the redelivery
        assert await repo.unresolved_ips() == []
        assert set(read_rows(pg_url)) == {"11.0.0.1", "11.0.0.2"}
    finally:
        await repo.close()


async def test_instances_starting_together_create_the_schema_once(pg_url: str) -> None:
    repos = await asyncio.gather(*(PostgresGeoRepository.open(pg_url) for _ in range(4)))
    try:
        counts = await asyncio.gather(*(r.upsert_many([row("11.0.0.1")]) for r in repos))
        assert counts == [1, 1, 1, 1]
    finally:
        for repo in repos:
            await repo.close()
    with psycopg.connect(pg_url) as db:
        columns = db.execute(
            "SELECT column_name, data_type, collation_name FROM information_schema.columns"
            " WHERE table_name = 'geo_cache' ORDER BY ordinal_position"
        ).fetchall()
    assert [c[0] for c in columns] == [
        "ip", "country_code", "country_name", "asn", "org", "cached_at", "resolution", "provider",
        "failed_since", "last_seen",
    ]  # fmt: skip
    assert {c[1] for c in columns} == {"text"}
    assert dict((c[0], c[2]) for c in columns)["cached_at"] == "C"


async def test_a_table_dropped_while_running_is_recreated_and_the_batch_requeued(
    pg_url: str,
) -> None:
    repo = await PostgresGeoRepository.open(pg_url)
    try:
        await repo.upsert_many([row("11.0.0.1")])
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("DROP TABLE geo_cache")
        with pytest.raises(Transient, match="recreated"):
            await repo.upsert_many([row("11.0.0.2")])
        assert await repo.upsert_many([row("11.0.0.2", None)]) == 1
        assert await repo.unresolved_ips() == ["11.0.0.2"]
    finally:
        await repo.close()


async def test_a_server_turned_read_only_is_transient_until_it_takes_writes_again(
    pg_url: str,
) -> None:
    """As after a failover: the connection is dropped, so the next batch finds a writable one."""
    database = pg_url.rsplit("/", 1)[1]
    repo = await PostgresGeoRepository.open(pg_url)
    try:
        await repo.upsert_many([row("11.0.0.1")])
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            with pytest.raises(Transient):  # the connection the server ended
                await repo.upsert_many([row("11.0.0.2")])
            with pytest.raises(Transient, match="read-only"):
                await repo.upsert_many([row("11.0.0.2")])
            admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        assert await repo.upsert_many([row("11.0.0.2")]) == 1
        assert set(read_rows(pg_url)) == {"11.0.0.1", "11.0.0.2"}
    finally:
        await repo.close()
