"""The whole pipeline against a real RabbitMQ and a real SQLite file (the tests that only look at
rows also against PostgreSQL): the three services run as subprocesses by their contract start
commands, in a fresh vhost per test."""

from __future__ import annotations

import sqlite3
from typing import Any

import aio_pika
import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    drain_queue,
    public_ips,
    publish,
    ready_count,
    wait_for_topology,
)
from bangui_geo.testing.expected import expected_row
from shared.ipnorm import normalize_ip

pytestmark = pytest.mark.integration

SERVICES = ("resolver", "timer", "persistence")


def summary(rows: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {ip: (r[0], r[1], r[5]) for ip, r in rows.items()}


async def test_mixed_burst_becomes_exact_rows_and_malformed_is_dead_lettered(
    any_store: ServiceGroup,
) -> None:
    # GEO_DB_PATH's parent folder is created (on SQLite; no file at all beside GEO_DB_URL).
    any_store.db_path = any_store.log_dir / "db" / "geo_cache.sqlite3"
    # Any start order: the timer first, then persistence; the resolver last, after publishing.
    any_store.start("timer")
    any_store.start("persistence")
    await wait_for_topology(any_store.amqp_url)

    public_v4 = public_ips(1500, seed=2)
    public_v6 = ["2001:4860:4860::8888", "2a00:1450:4001:82a::200e", "2400:cb00:2048:1::c629:d7a2"]
    mapped = ["::ffff:8.8.4.4", "::FFFF:1.0.0.1"]
    private = [
        "10.1.2.3",
        "192.168.0.7",
        "127.0.0.1",
        "169.254.9.9",
        "100.64.1.1",
        "::1",
        "fd00::5",
    ]
    unresolvable = ["192.88.99.1", "3fff::1"]
    bodies: list[Any] = []
    bodies += [{"ip": ip, "source": "test", "jail": "sshd"} for ip in public_v4[:1200]]
    bodies += [{"ips": public_v4[i : i + 100]} for i in range(1200, 1500, 100)]
    bodies += [{"ip": ip} for ip in public_v6 + mapped + private + unresolvable]
    bodies += [{"ips": [*public_v4[:50], "2001:4860:4860:0:0:0:0:8888"]}]  # duplicates
    bodies += [{"ip": ip} for ip in public_v4]  # duplicates again, single
    bodies += [{"ips": public_v4[i : i + 1]} for i in range(1200, 1500)]  # and bulk of one
    malformed: list[bytes] = [
        b"not json at all",
        b'{"ip": 12345}',
        b'{"ip": "300.1.2.3"}',
        b'{"ips": []}',
        b'{"ips": ["1.1.1.1", "nope"]}',
        b'{"ip": "1.1.1.1", "ips": ["1.1.1.1"]}',
        b"[1, 2, 3]",
        b'{"ips": [' + b",".join(b'"1.1.1.1"' for _ in range(1001)) + b"]}",
        b"\xff\xfe\x00garbage",
    ]
    # Interleave malformed bodies so the messages around them are processed normally.
    step = len(bodies) // len(malformed)
    for i, bad in enumerate(malformed):
        bodies.insert((i + 1) * step, bad)
    assert len(bodies) > 3000  # a burst of over 3,000 mixed messages
    await publish(any_store.amqp_url, "ip.seen", bodies)
    any_store.start("resolver")

    # 1.1.1.1 comes from the body that is half malformed: its valid part is kept.
    published = public_v4 + public_v6 + mapped + private + unresolvable + ["1.1.1.1"]
    all_ips = {normalize_ip(ip) for ip in published}
    expected = {ip: expected_row(ip) for ip in all_ips}

    async def complete() -> bool:
        return summary(any_store.rows()) == expected

    await async_poll(complete, deadline_s=30, what="geo_cache to hold exactly the expected rows")
    rows = any_store.rows()
    assert "8.8.4.4" in rows
    assert "1.0.0.1" in rows
    assert "::ffff:8.8.4.4" not in rows
    assert rows["2001:4860:4860::8888"][0] == "US"
    assert all(r[4].endswith("Z") and r[4][10] == "T" for r in rows.values())  # ISO-8601 UTC
    resolved = [r for r in rows.values() if r[5] == "resolved"]
    assert all(r[1] for r in resolved), "every resolved row has a country name"
    assert len(resolved) > 1400

    # The rows can be complete while the last duplicates and malformed bodies are still queued.
    dead: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def all_dead_lettered() -> bool:
        dead.extend(await drain_queue(any_store.amqp_url, "geo.dead_letter"))
        return len(dead) >= len(malformed)

    await async_poll(all_dead_lettered, deadline_s=20, what="every malformed body dead-lettered")
    partly = b'{"ips": ["1.1.1.1", "nope"]}'
    rejected_part = b'{"ips": ["nope"], "original_indexes": [1]}'  # only its invalid part
    assert sorted(m.body for m in dead) == sorted(
        rejected_part if body == partly else body for body in malformed
    )
    reasons = {m.body: str((m.headers or {})["x-geo-reject-reason"]) for m in dead}
    assert "not valid JSON" in reasons[b"not json at all"]
    assert "300.1.2.3" in reasons[b'{"ip": "300.1.2.3"}']
    assert "1000" in reasons[malformed[7]]
    assert all((m.headers or {})["x-geo-original-routing-key"] == "ip.seen" for m in dead)

    assert all(p.running for p in any_store.processes.values()), "every service still runs"
    assert any_store.stop_all() == {name: 0 for name in SERVICES}


async def test_shutdown_flushes_what_the_resolver_holds(service_group: ServiceGroup) -> None:
    # No timer and a long interval: only the resolver's final flush on SIGTERM can write rows.
    service_group.start("persistence")
    resolver = service_group.start("resolver", GEO_FLUSH_INTERVAL="3600")
    await wait_for_topology(service_group.amqp_url)
    await publish(service_group.amqp_url, "ip.seen", [{"ips": ["8.8.8.8", "1.1.1.1", "10.0.0.1"]}])
    await async_poll(
        lambda: any(e.get("event") == "resolver_ready" for e in resolver.log_events()),
        deadline_s=10,
        what="resolver ready",
    )
    await async_poll(lambda: _all_delivered(service_group), deadline_s=10, what="delivery held")
    assert service_group.rows() == {}
    assert resolver.stop() == 0

    async def written() -> bool:
        return set(service_group.rows()) == {"8.8.8.8", "1.1.1.1", "10.0.0.1"}

    await async_poll(written, deadline_s=10, what="final flush persisted")
    assert service_group.processes["persistence"].stop() == 0


async def test_killed_resolver_loses_nothing(any_store: ServiceGroup) -> None:
    # The resolver acks ip.seen only once the geo.upsert carrying it is confirmed, so a
    # SIGKILL before any flush leaves the deliveries in the queue for the next resolver.
    any_store.start("persistence")
    first = any_store.start("resolver", GEO_FLUSH_INTERVAL="3600")
    await wait_for_topology(any_store.amqp_url)
    ips = public_ips(300, seed=3)
    await publish(any_store.amqp_url, "ip.seen", [{"ip": ip} for ip in ips])
    await async_poll(lambda: _all_delivered(any_store), deadline_s=10, what="resolver holds all")
    assert any_store.rows() == {}
    first.kill()
    any_store.start("resolver")
    any_store.start("timer")

    async def all_rows() -> bool:
        return set(any_store.rows()) == set(ips)

    await async_poll(all_rows, deadline_s=20, what="all IPs persisted after the restart")


async def test_re_resolve_round_trip(service_group: ServiceGroup) -> None:
    # Rows left unresolved earlier (a provider outage, or the original BanGUI's table) are
    # retried; not-global and rejected rows never are.
    with sqlite3.connect(service_group.db_path) as db:
        db.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"  # the original BanGUI's columns
        )
        db.executemany(
            "INSERT INTO geo_cache (ip, cached_at) VALUES (?, '2020-01-01T00:00:00.000000Z')",
            [("8.8.8.8",), ("1.1.1.1",), ("2a00:1450:4001:82a::200e",), ("10.0.0.1",)],
        )
    service_group.start("persistence")
    await wait_for_topology(service_group.amqp_url)
    db_path = service_group.db_path
    with sqlite3.connect(db_path) as db:  # schema migrated: add a failed, a rejected row
        db.execute(
            "INSERT INTO geo_cache (ip, country_code, country_name, asn, org, cached_at,"
            " resolution, provider)"
            " VALUES ('9.9.9.9', NULL, NULL, NULL, NULL,"
            " '2020-01-01T00:00:00.000000Z', 'failed', 'ip-api')"
        )
        db.execute(
            "INSERT INTO geo_cache (ip, country_code, country_name, asn, org, cached_at,"
            " resolution, provider)"
            " VALUES ('4.4.4.4', NULL, NULL, NULL, NULL,"
            " '2020-01-01T00:00:00.000000Z', 'rejected', 'ip-api')"
        )
    service_group.start("resolver")
    service_group.start("timer", GEO_RE_RESOLVE_INTERVAL="1.0")

    async def retried() -> bool:
        rows = service_group.rows()
        return all(
            rows[ip][0] for ip in ("8.8.8.8", "1.1.1.1", "2a00:1450:4001:82a::200e", "9.9.9.9")
        )

    await async_poll(retried, deadline_s=20, what="unresolved rows resolved by re-resolve")
    rows = service_group.rows()
    assert rows["8.8.8.8"][:2] == ("US", "United States")
    assert rows["9.9.9.9"][5] == "resolved"
    assert rows["10.0.0.1"][0] is None  # a legacy private row is never sent for retry
    assert rows["4.4.4.4"][0] is None
    assert rows["4.4.4.4"][5] == "rejected"
    retries = [
        e
        for e in service_group.processes["persistence"].log_events()
        if e.get("event") == "geo_re_resolve_ran"
    ]
    assert retries
    assert retries[0]["retried"] == 4
    assert service_group.stop_all() == {name: 0 for name in SERVICES}


async def _all_delivered(service_group: ServiceGroup) -> bool:
    """Nothing ready in ip.seen: the resolver holds every delivery (none is persisted yet)."""
    return await ready_count(service_group.amqp_url, "geo.resolver.ip_seen") == 0


async def test_copies_routed_around_the_topology_are_dead_lettered(
    service_group: ServiceGroup,
) -> None:
    # RabbitMQ 3.x topic permissions ignore CC/BCC, and the default exchange routes by queue
    # name: a consumer refuses any delivery whose routing key its queue is not bound to.
    service_group.start("persistence")
    service_group.start("resolver")
    service_group.start("timer")
    await wait_for_topology(service_group.amqp_url)
    connection = await aio_pika.connect(service_group.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("bangui")
        forged = b'{"batch_id": "x", "rows": [{"ip": "6.6.6.6", "resolution": "resolved",'
        forged += b' "country_code": "ZZ", "cached_at": "2030-01-01T00:00:00Z"}]}'
        await exchange.publish(
            aio_pika.Message(b'{"ip": "8.8.8.8"}', headers={"CC": ["geo.upsert"]}), "ip.seen"
        )
        await channel.default_exchange.publish(aio_pika.Message(forged), "geo.persistence.upsert")

    await async_poll(
        lambda: "8.8.8.8" in service_group.rows(), deadline_s=15, what="the real ip.seen"
    )

    async def two_dead_letters() -> list[aio_pika.abc.AbstractIncomingMessage] | None:
        got = await drain_queue(service_group.amqp_url, "geo.dead_letter")
        collected.extend(got)
        return collected if len(collected) >= 2 else None

    collected: list[aio_pika.abc.AbstractIncomingMessage] = []
    dead = await async_poll(two_dead_letters, deadline_s=15, what="both copies dead-lettered")
    reasons = sorted(str((m.headers or {})["x-geo-reject-reason"]) for m in dead)
    assert reasons == [
        "routing key 'geo.persistence.upsert' is not bound to geo.persistence.upsert",
        "routing key 'ip.seen' is not bound to geo.persistence.upsert",
    ]
    assert "6.6.6.6" not in service_group.rows()
    assert service_group.rows()["8.8.8.8"][0] == "US"


async def test_a_queue_with_other_arguments_stops_the_service_with_one_clear_line(
    service_group: ServiceGroup,
) -> None:
    # e.g. left by an older version: RabbitMQ refuses to redeclare it with other arguments.
    connection = await aio_pika.connect(service_group.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("geo.persistence.upsert", durable=True)
    persistence = service_group.start("persistence")
    assert persistence.process is not None
    assert persistence.process.wait(timeout=20) == 1
    failed = [e for e in persistence.log_events() if e.get("event") == "service_start_failed"]
    assert len(failed) == 1
    reason = failed[0]["reason"]
    assert reason.startswith("queue geo.persistence.upsert exists with other arguments")
    assert "x-single-active-consumer" in reason
    assert "rabbitmqctl delete_queue" in reason
    assert not any(e.get("event") == "service_crashed" for e in persistence.log_events())
