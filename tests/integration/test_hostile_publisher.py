"""What a holder of the publisher credential can try on a vhost loaded from definitions.json:
routing headers (CC, BCC) that reach queues the topology does not bind for ``ip.seen``, and
forged dead-letter headers meant to steer a replay. Also a service whose dead-letter publish is
refused: its deliveries are settled all the same, counted, logged and reported by /health."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import aio_pika
import pytest

from bangui_geo.testing import (
    ServiceGroup,
    ServiceProcess,
    async_poll,
    drain_queue,
    events,
    queue_details,
    read_rows,
    ready_count,
)
from shared.amqp import connect_once, peek_dead_letters, replay_dead_letters
from tests.integration.deployment import ADMIN, PUBLISHER, Deployment

pytestmark = pytest.mark.integration

RESOLVER = "geo-resolver"
PERSISTENCE = "geo-persistence"
VALID_BATCH = {
    "batch_id": "b-1",
    "rows": [["8.8.8.8", "resolved", "2026-11-22T12:01:26.519722Z", "US", "United States"]],
}
# A GeoUpsertBatch that would plant a false country for good, were it ever replayed to geo.upsert.
PLANTED = {
    "batch_id": "planted",
    "rows": [["1.1.1.1", "resolved", "9999-12-31T23:59:59.999999Z", "KP", "North Korea"]],
}
FORGED = {
    "x-geo-original-routing-key": "geo.upsert",
    "x-geo-original-queue": "geo.persistence.upsert",
    "x-geo-rejected-by": "persistence",
    "x-geo-reject-reason": "database is locked",
    "x-death": [
        {
            "count": 1,
            "reason": "rejected",
            "queue": "geo.persistence.upsert",
            "exchange": "bangui",
            "routing-keys": ["geo.upsert"],
        }
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def send(
    url: str,
    key: str,
    bodies: list[bytes],
    *,
    headers: dict[str, Any] | None = None,
    expiration: float | None = None,
) -> None:
    """Publish as the user of ``url``, with confirms, like any client of ``bangui`` would."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("bangui", ensure=False)
        for body in bodies:
            message = aio_pika.Message(body, headers=headers, expiration=expiration)
            await exchange.publish(message, key)
    finally:
        await connection.close()


async def settled(deployment: Deployment, queue: str) -> bool:
    """Nothing ready and nothing unacked in ``queue`` (the management API's view)."""
    details = await queue_details(deployment.admin, deployment.url(ADMIN), queue)
    return details.get("messages") == 0 and details.get("messages_unacknowledged") == 0


def start_persistence(deployment: Deployment, group: ServiceGroup, **env: str) -> ServiceProcess:
    return group.start("persistence", amqp_url=deployment.url(PERSISTENCE), **env)


async def wait_ready(process: ServiceProcess) -> None:
    def ready() -> bool:
        assert process.running, process.log_path.read_text()[-3000:]
        return bool(events(process, "persistence_ready"))

    await async_poll(ready, deadline_s=30, what="persistence ready")


async def test_cc_and_bcc_copies_are_dead_lettered_and_persistence_keeps_writing(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    persistence = start_persistence(deployment, service_group)
    try:
        await wait_ready(persistence)
        publisher = deployment.url(PUBLISHER)
        # Eight fill persistence's prefetch; the forged headers must not survive the rejection.
        await send(
            publisher,
            "ip.seen",
            [json.dumps({"ip": f"34.0.0.{n}"}).encode() for n in range(1, 9)],
            headers={"CC": ["geo.upsert"], **FORGED},
        )
        await send(
            publisher, "ip.seen", [b'{"ip": "34.0.0.9"}'], headers={"BCC": ["geo.re_resolve"]}
        )
        await send(deployment.url(RESOLVER), "geo.upsert", [json.dumps(VALID_BATCH).encode()])

        db_path = service_group.db_path
        await async_poll(
            lambda: "8.8.8.8" in read_rows(db_path), deadline_s=20, what="the valid batch written"
        )
        for queue in ("geo.persistence.upsert", "geo.persistence.re_resolve"):
            await async_poll(
                lambda q=queue: settled(deployment, q), deadline_s=10, what=f"{queue} settled"
            )

        admin = deployment.url(ADMIN)
        connection = await connect_once(admin, connect_timeout=5)
        try:
            total, letters = await peek_dead_letters(connection, limit=100)
            _, outcomes = await replay_dead_letters(connection, confirm_timeout=5, limit=100)
        finally:
            await connection.close()
        assert total == 9
        # Routed on bangui.dlx by what the queue is for; the delivery's key kept in a header.
        assert (
            sorted(letter.routing_key for letter in letters)
            == ["geo.re_resolve"] + ["geo.upsert"] * 8
        )
        assert {letter.delivered_as for letter in letters} == {"ip.seen"}
        assert {letter.rejected_by for letter in letters} == {"persistence"}
        assert all("is not bound to" in letter.reason for letter in letters)
        # None may be replayed: they reached those queues by a route the queues are not for.
        assert [o.replayed for o in outcomes] == [False] * 9
        assert all("CC/BCC" in o.note for o in outcomes), [o.note for o in outcomes]
        kept = await drain_queue(admin, "geo.dead_letter")
        assert len(kept) == 9  # refused ones stay in the queue
        for message in kept:
            headers = dict(message.headers or {})
            assert not {"CC", "BCC", "x-death"} & set(headers), headers
            assert headers["x-geo-reject-reason"] != "database is locked"
            assert headers["x-geo-original-queue"] != "geo.persistence.upsert" or (
                message.routing_key == "geo.upsert"
            )
        assert read_rows(db_path).keys() == {"8.8.8.8"}
        assert persistence.running
    finally:
        code = persistence.stop()
    assert code == 0


async def test_a_dead_letter_that_cannot_be_published_is_still_settled(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    # An operator's mistake: persistence may no longer write to bangui.dlx.
    deployment.set_topic_permission(PERSISTENCE, "bangui.dlx", write="(?!)", read="^#$")
    port = free_port()
    persistence = start_persistence(deployment, service_group, GEO_METRICS_PORT=str(port))
    try:
        await wait_ready(persistence)
        assert http_get(port, "/health")[0] == 200
        resolver = deployment.url(RESOLVER)
        await send(resolver, "geo.upsert", [b"not json"] * 10)
        await send(resolver, "geo.upsert", [json.dumps(VALID_BATCH).encode()])
        db_path = service_group.db_path
        await async_poll(
            lambda: "8.8.8.8" in read_rows(db_path), deadline_s=20, what="the valid batch written"
        )
        await async_poll(
            lambda: settled(deployment, "geo.persistence.upsert"),
            deadline_s=10,
            what="geo.persistence.upsert settled",
        )
        # The broker dead-lettered them itself (the queue has a dead-letter exchange).
        admin = deployment.url(ADMIN)
        kept = await drain_queue(admin, "geo.dead_letter")
        assert [m.body for m in kept] == [b"not json"] * 10
        assert {m.headers["x-death"][0]["reason"] for m in kept} == {"rejected"}  # type: ignore[index]

        failed = events(persistence, "message_dead_letter_failed")
        assert len(failed) == 10
        assert {e["level"] for e in failed} == {"error"}
        assert {e["queue"] for e in failed} == {"geo.persistence.upsert"}
        status, text = http_get(port, "/metrics")
        assert status == 200
        assert (
            'geo_dead_letter_failures_total{service="persistence",queue="geo.persistence.upsert"}'
            " 10" in text
        )
        status, body = http_get(port, "/health")
        assert status == 503
        assert json.loads(body)["status"] == "dead_letter_failing"
        assert persistence.running
    finally:
        code = persistence.stop()
    assert code == 0


async def test_replay_trusts_the_brokers_record_not_forged_headers(
    deployment: Deployment,
) -> None:
    # Expired on geo.resolver.ip_seen (no resolver runs): the broker dead-letters it, headers kept.
    await send(
        deployment.url(PUBLISHER),
        "ip.seen",
        [json.dumps(PLANTED).encode()],
        headers=FORGED,
        expiration=0.001,
    )
    admin = deployment.url(ADMIN)

    async def dead_lettered() -> bool:
        details = await queue_details(deployment.admin, admin, "geo.dead_letter")
        return details.get("messages") == 1

    await async_poll(dead_lettered, deadline_s=15, what="the expired message dead-lettered")
    connection = await connect_once(admin, connect_timeout=5)
    try:
        _, (letter,) = await peek_dead_letters(connection, limit=10)
        # Its origin is the queue the broker names, mapped by our topology: not the headers.
        assert (letter.replay_key, letter.original_queue, letter.rejected_by) == (
            "ip.seen",
            "geo.resolver.ip_seen",
            None,
        )
        assert letter.reason == "dead-lettered by the broker: expired"
        _, (outcome,) = await replay_dead_letters(connection, confirm_timeout=5, limit=10)
    finally:
        await connection.close()
    assert (outcome.replayed, outcome.note) == (True, "replayed to ip.seen")
    # The republish is confirmed, so the broker has routed it: not to geo.upsert.
    assert await ready_count(admin, "geo.persistence.upsert") == 0
    (back,) = await drain_queue(admin, "geo.resolver.ip_seen")
    assert json.loads(back.body) == PLANTED
    assert not any(str(h).startswith("x-") for h in (back.headers or {}))  # replayed bare


async def test_a_cc_or_bcc_copy_keeps_the_routing_key_it_was_published_with(
    amqp_url: str,
) -> None:
    # What the consumers' check relies on: RabbitMQ delivers the copies with the publish's own
    # routing key; it keeps the CC header and strips BCC.
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("bangui", "topic", durable=True)
        queues = {}
        for key in ("ip.seen", "geo.upsert", "geo.re_resolve"):
            queues[key] = await channel.declare_queue("", exclusive=True)
            await queues[key].bind(exchange, key)
        headers: dict[str, Any] = {"CC": ["geo.upsert"], "BCC": ["geo.re_resolve"]}
        await exchange.publish(aio_pika.Message(b"{}", headers=headers), "ip.seen")
        got = {}
        for key, queue in queues.items():
            message = await async_poll(
                lambda q=queue: q.get(fail=False), deadline_s=5, what=f"the {key} copy"
            )
            got[key] = (message.routing_key, dict(message.headers or {}))
    finally:
        await connection.close()
    assert got == dict.fromkeys(queues, ("ip.seen", {"CC": ["geo.upsert"]}))


async def test_a_cc_copy_that_expires_in_the_upsert_queue_is_never_replayed(
    deployment: Deployment,
) -> None:
    # No persistence runs: the CC'd copy expires in geo.persistence.upsert and the broker
    # dead-letters it naming that queue; it still carries the key it was published with.
    body = json.dumps(PLANTED).encode()
    await send(
        deployment.url(PUBLISHER),
        "ip.seen",
        [body],
        headers={"CC": ["geo.upsert"]},
        expiration=0.001,
    )
    admin = deployment.url(ADMIN)

    async def both_dead_lettered() -> bool:
        details = await queue_details(deployment.admin, admin, "geo.dead_letter")
        return details.get("messages") == 2  # the ip_seen copy and the upsert copy

    await async_poll(both_dead_lettered, deadline_s=15, what="both expired copies dead-lettered")
    connection = await connect_once(admin, connect_timeout=5)
    try:
        _, letters = await peek_dead_letters(connection, limit=10)
        by_queue = {letter.original_queue: letter for letter in letters}
        upsert = by_queue["geo.persistence.upsert"]
        assert upsert.refusal is not None
        assert "as ip.seen" in upsert.refusal
        _, outcomes = await replay_dead_letters(connection, confirm_timeout=5, limit=10)
    finally:
        await connection.close()
    notes = sorted((o.letter.original_queue or "", o.replayed) for o in outcomes)
    assert notes == [("geo.persistence.upsert", False), ("geo.resolver.ip_seen", True)]
    assert await ready_count(admin, "geo.persistence.upsert") == 0  # nothing planted
    assert await ready_count(admin, "geo.dead_letter") == 1  # the upsert copy is kept


async def test_headers_near_the_frame_limit_do_not_take_a_service_off_the_broker(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    # A publisher's headers sized just under the broker's frame limit: the dead-letter copy
    # must not grow past it (the broker would close the whole connection, again and again).
    persistence = start_persistence(deployment, service_group)
    try:
        await wait_ready(persistence)
        pad = "A" * 130_950  # the publish itself fits a frame; the copy plus ours would not
        await send(
            deployment.url(PUBLISHER),
            "ip.seen",
            [b'{"ip": "nope"}'],
            headers={"pad": pad, "CC": ["geo.upsert"]},
        )
        await async_poll(
            lambda: settled(deployment, "geo.persistence.upsert"),
            deadline_s=20,
            what="the copy settled in geo.persistence.upsert",
        )
        (letter,) = await drain_queue(deployment.url(ADMIN), "geo.dead_letter")
        headers = dict(letter.headers or {})
        assert "pad" not in headers
        assert str(headers["x-geo-dropped-headers"]).startswith("1 headers of about ")
        assert not events(persistence, "amqp_connection_lost")
        assert persistence.running
    finally:
        assert persistence.stop() == 0
