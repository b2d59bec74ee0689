"""``geo.lookup`` end to end: the services by their start commands on a real broker and a real
SQLite file, two resolver replicas competing for requests, answered by direct reply-to and at a
requester's own queue; malformed requests, the deadline's ``pending``, ``GeoClient`` and
``bangui-geo lookup --live``."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceGroup,
    async_poll,
    drain_queue,
    read_rows,
    wait_for_topology,
)
from bangui_geo.testing.amqp import ready_count
from bangui_geo.testing.http import free_port, scraped
from bangui_geo.testing.ipapi_standin import IpApiStandIn, Outage, ThreadedStandIn, expected_geo
from bangui_geo.testing.ips import known_public_ips
from shared.client import GeoClient, LookupFailed

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in() -> Iterator[ThreadedStandIn]:
    api = IpApiStandIn(requests_per_window=1000, window=1.0, hang_s=1.5)
    with ThreadedStandIn(api) as served:
        yield served


async def ask(
    channel: aio_pika.abc.AbstractChannel,
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    body: bytes,
    reply_to: str | None,
) -> tuple[str, aio_pika.abc.AbstractIncomingMessage]:
    correlation_id = uuid.uuid4().hex
    exchange = await channel.get_exchange("bangui")
    await exchange.publish(
        aio_pika.Message(body, correlation_id=correlation_id, reply_to=reply_to), "geo.lookup"
    )
    return correlation_id, await asyncio.wait_for(replies.get(), 10)


def resolved(ip: str) -> list[Any]:
    geo = expected_geo(ip)
    assert geo is not None
    return [ip, "resolved", geo.country_code, geo.country_name, geo.asn, geo.org, "ip-api"]


def without_time(row: list[Any]) -> list[Any]:
    assert row[2] is not None
    return [row[0], row[1], *row[3:]]


async def test_lookup_requests_are_answered_in_order_by_competing_replicas(
    service_group: ServiceGroup, stand_in: ThreadedStandIn
) -> None:
    amqp_url, db_path = service_group.amqp_url, service_group.db_path
    service_group.env.update(
        GEO_PROVIDER="ip-api",
        GEO_IPAPI_URL=stand_in.url,
        GEO_IPAPI_REQUESTS_PER_WINDOW="1000",
        GEO_IPAPI_WINDOW="1",
        GEO_IPAPI_TIMEOUT="5",
    )
    ports = [free_port(), free_port()]
    public = known_public_ips(400, seed=53)
    connection = await aio_pika.connect(amqp_url)
    try:
        service_group.start("persistence")
        service_group.start("timer")
        for i, port in enumerate(ports, 1):
            service_group.start("resolver", f"resolver-{i}", GEO_METRICS_PORT=str(port))
        await wait_for_topology(amqp_url)

        async def serving() -> bool:
            return all(scraped(p, "geo_lookups_total") == 0 for p in ports)

        await async_poll(serving, deadline_s=20, what="both resolvers serving")

        # GeoClient: request order, normalized addresses, duplicates kept, then stored.
        asked = [public[0], "::ffff:" + public[1], "10.1.2.3", public[0], "2001:DB8::1"]
        async with GeoClient.connect(amqp_url) as geo:
            rows = await geo.lookup(asked, timeout=5)
            with pytest.raises(ValueError, match=r"ips\[1\]"):
                await geo.lookup(["1.2.3.4", "nope"])
        assert [r.ip for r in rows] == [public[0], public[1], "10.1.2.3", public[0], "2001:db8::1"]
        assert without_time(list(rows[0])) == resolved(public[0])
        assert rows[0] == rows[3]
        assert [r.resolution for r in rows[2:]] == ["not_global", "resolved", "not_global"]

        async def stored() -> bool:
            return {public[0], public[1], "10.1.2.3"} <= set(read_rows(db_path))

        await async_poll(stored, deadline_s=20, what="looked-up rows in geo_cache")

        # Direct reply-to by hand, and a requester's own queue.
        channel = await connection.channel()
        direct: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        pseudo = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await pseudo.consume(direct.put, no_ack=True)
        body = json.dumps({"ips": public[2:102], "timeout_ms": 5000}).encode()
        correlation_id, reply = await ask(channel, direct, body, "amq.rabbitmq.reply-to")
        assert reply.correlation_id == correlation_id
        answer = json.loads(reply.body)["rows"]
        assert [without_time(r) for r in answer] == [resolved(ip) for ip in public[2:102]]

        own_channel = await connection.channel()
        own = await own_channel.declare_queue(exclusive=True)
        mine: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await own.consume(mine.put, no_ack=True)
        correlation_id, reply = await ask(own_channel, mine, body, own.name)
        assert reply.correlation_id == correlation_id
        again = json.loads(reply.body)["rows"]  # either replica: the same answers
        assert [without_time(r) for r in again] == [without_time(r) for r in answer]

        # Malformed: answered with the reason when it can be, dead-lettered when not.
        for bad in (b'{"ips": ["nope"]}', b'{"ips": []}', b"not json", b'{"ips":["1.1.1.1"],'
                    b'"timeout_ms": 30001}'):  # fmt: skip
            _, reply = await ask(channel, direct, bad, "amq.rabbitmq.reply-to")
            assert set(json.loads(reply.body)) == {"error"}
        _, reply = await ask(channel, direct, b'{"ips": ["nope"]}', "amq.rabbitmq.reply-to")
        assert "not an IPv4 or IPv6 address" in json.loads(reply.body)["error"]
        exchange = await channel.get_exchange("bangui")
        await exchange.publish(aio_pika.Message(b'{"ips": ["nope"]}'), "geo.lookup")
        await exchange.publish(aio_pika.Message(b'{"ips": ["1.1.1.1"]}'), "geo.lookup")

        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def dead_lettered() -> bool:
            dead.extend(await drain_queue(amqp_url, "geo.dead_letter"))
            return len(dead) >= 2

        await async_poll(dead_lettered, deadline_s=10, what="two dead-lettered requests")
        reasons = sorted(str((m.headers or {})["x-geo-reject-reason"]) for m in dead)
        assert "needs a reply_to" in reasons[0]
        assert "no reply_to" in reasons[1]
        assert {m.routing_key for m in dead} == {"geo.lookup"}

        # 200 concurrent requesters, each on its own direct reply-to: all answered, by both.
        async def requester(i: int) -> int:
            async with GeoClient.connect(amqp_url) as geo:
                return len(await geo.lookup(public[i % 300 : i % 300 + 100], timeout=10))

        counts = await asyncio.gather(*(requester(i) for i in range(200)))
        assert counts == [100] * 200
        answered = [scraped(p, "geo_lookup_requests_total") or 0 for p in ports]
        assert all(n > 0 for n in answered), answered

        # The deadline: a provider that hangs makes the addresses pending; they are still
        # resolved afterwards (here: the hang ends in a failure, stored as a failed row).
        stand_in.set_outage(Outage.HANG)
        late = known_public_ips(3, seed=59)
        async with GeoClient.connect(amqp_url) as geo:
            rows = await geo.lookup([*late, public[0]], timeout=0.5)
        assert [r.resolution for r in rows] == ["pending"] * 3 + ["resolved"]
        assert rows[0][2:] == (None,) * 6

        async def late_stored() -> bool:
            return set(late) <= set(read_rows(db_path))

        await async_poll(late_stored, deadline_s=20, what="pending addresses stored")
        stand_in.set_outage(Outage.NONE)

        # The CLI asks over the broker.
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "services.cli", "lookup", "--live", public[5], "192.168.0.1"),
            cwd=REPO_ROOT,
            env=service_group.env_for(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, err.decode()
        stdout = out.decode()
        geo5 = expected_geo(public[5])
        assert geo5 is not None
        assert geo5.country_name is not None
        assert geo5.country_name in stdout
        assert "not_global" in stdout
        assert service_group.stop_all() == dict.fromkeys(
            ("timer", "resolver-1", "resolver-2", "persistence"), 0
        )
    finally:
        await connection.close()


async def test_geo_client_says_when_no_resolver_answers(service_group: ServiceGroup) -> None:
    amqp_url = service_group.amqp_url
    persistence = service_group.start("persistence")
    try:
        await wait_for_topology(amqp_url)
        async with GeoClient.connect(amqp_url) as geo:
            with pytest.raises(LookupFailed, match="no resolver answered"):
                await geo.lookup(["1.1.1.1"], timeout=0.2)
    finally:
        persistence.stop()


async def test_an_unanswered_known_question_never_reaches_geo_dead_letter(amqp_url: str) -> None:
    """The resolver's geo.known questions carry no TTL: their queue dead-letters what expires
    in it, so a question persistence did not answer in time (it was away, reconnecting) would
    sit in geo.dead_letter beside the bad input. A request with a TTL shows why."""
    from shared.amqp import declare_topology
    from shared.amqp.requests import Requester

    connection = await aio_pika.connect(amqp_url)
    try:
        await declare_topology(await connection.channel())
        requester = await Requester.open(connection)
        body = b'{"ips": ["8.8.8.8"]}'
        assert await requester.request("geo.known", body, 0.2) is None
        await async_poll(
            lambda: ready_count(amqp_url, "geo.dead_letter"), deadline_s=10, what="expired one"
        )
        assert await requester.request("geo.known", body, 0.2, expire=False) is None
        await asyncio.sleep(0.5)
        assert await ready_count(amqp_url, "geo.persistence.known") == 1  # waits for an answer
        (dead,) = await drain_queue(amqp_url, "geo.dead_letter")  # only the one with a TTL
        assert dead.headers["x-death"][0]["reason"] == "expired"
        await requester.close()
    finally:
        await connection.close()
