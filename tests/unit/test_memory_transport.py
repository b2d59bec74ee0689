"""The in-memory broker behaves as RabbitMQ does where the services rely on it: topic routing
(CC/BCC included), per-channel delivery tags, prefetch, requeue marking ``redelivered``, broker
dead-lettering of a rejected message, exclusive queues gone with their connection, replies at
``reply_to``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from shared import topology
from shared.amqp import amqp_config
from shared.amqp.memory import (
    MemoryBroker,
    MemoryChannel,
    MemoryQueueHandle,
    MemoryReplier,
    MemoryRequester,
    Unroutable,
    topic_matches,
)
from shared.routes import FLUSH, Plain, wire
from shared.settings import Settings


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("#", "ip.seen", True),
        ("#", "x", True),
        ("ip.seen", "ip.seen", True),
        ("ip.seen", "ip.resolved", False),
        ("ip.*", "ip.seen", True),
        ("ip.*", "ip.seen.more", False),
        ("ip.#", "ip", True),
        ("geo.#.x", "geo.a.b.x", True),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_routing_follows_the_topology_and_cc_and_bcc() -> None:
    broker = MemoryBroker()
    assert broker.send("ip.seen", b"{}", headers={"CC": ["geo.upsert"], "BCC": ["geo.retry"]})
    assert broker.ready("geo.resolver.ip_seen") == 1
    (copy,) = broker.take("geo.persistence.upsert")
    assert copy.routing_key == "ip.seen"  # the published key, not the CC's
    assert copy.headers == {"CC": ["geo.upsert"]}  # BCC is stripped, CC kept
    assert broker.ready("geo.resolver.retry") == 1
    assert broker.send("ip.resolved", b"{}") == 0  # nobody of ours listens
    with pytest.raises(Unroutable):
        broker.publish(topology.EXCHANGE, "ip.resolved", b"{}", Basic.Properties(), mandatory=True)
    # The default exchange routes by queue name.
    assert broker.send("geo.persistence.upsert", b"{}", exchange="") == 1


class Recorder:
    def __init__(self) -> None:
        self.got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        await self.got.put(message)

    async def next(self) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self.got.get(), 2)


async def consume(broker: MemoryBroker, queue: str, prefetch: int) -> tuple[Recorder, Any]:
    channel = MemoryChannel(broker, prefetch)
    recorder = Recorder()
    await MemoryQueueHandle(broker.queues[queue], channel).consume(recorder)
    return recorder, channel


async def test_tags_prefetch_requeue_and_redelivered() -> None:
    broker = MemoryBroker()
    for body in (b"1", b"2", b"3"):
        broker.send("geo.upsert", body)
    recorder, channel = await consume(broker, "geo.persistence.upsert", prefetch=2)
    first, second = await recorder.next(), await recorder.next()
    assert (first.delivery_tag, second.delivery_tag) == (1, 2)
    assert recorder.got.empty()  # the prefetch holds the third back
    assert broker.ready("geo.persistence.upsert") == 1
    await first.nack(requeue=True)  # back at the head, marked redelivered
    again = await recorder.next()
    assert (again.body, again.redelivered, again.delivery_tag) == (b"1", True, 3)
    await second.ack()
    third = await recorder.next()
    assert (third.body, third.redelivered) == (b"3", False)
    await again.ack()
    await third.ack()
    assert channel.unacked == {}
    # A closed channel's deliveries go back, redelivered, to the next consumer.
    broker.send("geo.upsert", b"4")
    held = await recorder.next()
    assert held.body == b"4"
    channel.close()
    other, _ = await consume(broker, "geo.persistence.upsert", prefetch=0)
    back = await other.next()
    assert (back.body, back.redelivered, back.delivery_tag) == (b"4", True, 1)


async def test_a_rejected_message_is_dead_lettered_by_the_broker_where_its_queue_says() -> None:
    broker = MemoryBroker()
    broker.send("geo.upsert", b"poison")
    broker.send("geo.re_resolve", b"stale")
    upserts, _ = await consume(broker, "geo.persistence.upsert", prefetch=1)
    re_resolves, _ = await consume(broker, "geo.persistence.re_resolve", prefetch=1)
    await (await upserts.next()).reject(requeue=False)
    await (await re_resolves.next()).reject(requeue=False)  # no dead-letter exchange: dropped
    (dead,) = broker.take(topology.DEAD_LETTER_QUEUE)
    assert (dead.body, dead.routing_key) == (b"poison", "geo.upsert")
    assert dead.headers["x-death"][0]["queue"] == "geo.persistence.upsert"


async def test_a_per_replica_queue_is_its_connections_own() -> None:
    broker = MemoryBroker()
    settings = Settings()
    flushed: list[str] = []

    async def on_flush(cmd: Any) -> None:
        flushed.append(cmd.tick_id)

    one = await broker.open(amqp_config(settings), service="resolver", stop=asyncio.Event())
    two = await broker.open(amqp_config(settings), service="resolver", stop=asyncio.Event())
    for transport in (one, two):
        await transport.consume_route(wire(FLUSH, Plain(on_flush)), prefetch=4)
    body = b'{"tick_id": "flush:1", "issued_at": "2026-01-01T00:00:00Z"}'
    assert broker.send("geo.flush", body) == 2  # every replica gets every geo.flush
    await asyncio.sleep(0.05)
    assert flushed == ["flush:1", "flush:1"]
    await one.close()
    assert broker.send("geo.flush", body) == 1
    assert not [name for name in broker.queues if name.endswith(".memory.1")]
    await two.close()


async def test_one_timer_leads_and_a_standby_takes_over_when_it_closes() -> None:
    # The timer's real bootstrap over memory: only the lock's holder publishes geo.flush.
    from services.timer import bootstrap as timer

    broker = MemoryBroker()
    settings = Settings(flush_interval=0.05, re_resolve_interval=3600)
    broker.declare("flushes", ("geo.flush",), dead_letter=False)
    first_stop, second_stop = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(timer.run(settings, first_stop, transport=broker.open))
    await asyncio.sleep(0.3)
    second = asyncio.create_task(timer.run(settings, second_stop, transport=broker.open))
    await asyncio.sleep(0.3)
    ticks = broker.take("flushes")
    led_by_one = {json.loads(m.body)["tick_id"] for m in ticks}
    assert len(ticks) == len(led_by_one) >= 3  # one publisher: no tick twice
    first_stop.set()
    await asyncio.wait_for(first, 5)
    await asyncio.sleep(0.5)
    assert broker.take("flushes")  # the standby leads now
    second_stop.set()
    await asyncio.wait_for(second, 5)
    assert broker.leaders == {}


async def test_a_request_is_answered_at_its_reply_to_and_unanswered_is_none() -> None:
    broker = MemoryBroker()
    requester = MemoryRequester(broker)
    assert await requester.request("geo.lookup", b"{}", wait=0.05) is None  # nobody answered
    assert len(broker.take("geo.resolver.lookup")) == 1  # (TTLs are not modelled: drop it)
    recorder, _ = await consume(broker, "geo.resolver.lookup", prefetch=1)
    asking = asyncio.ensure_future(requester.request("geo.lookup", b'{"ips": ["1.1.1.1"]}', 2))
    request = await recorder.next()
    assert request.reply_to is not None
    assert request.reply_to.startswith(topology.DIRECT_REPLY_TO)
    await MemoryReplier(broker).reply(request, b'{"rows": []}')
    assert await asking == b'{"rows": []}'
