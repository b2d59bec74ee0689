"""The timer against a real broker: fixed cadence, tick ids, message TTL, one active timer."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest

from bangui_geo.testing import ServiceGroup, ServiceProcess, async_poll
from bangui_geo.testing.broker import BrokerAdmin

pytestmark = pytest.mark.integration

FLUSH = 0.4
RE_RESOLVE = 1.2


class Tap:
    """A private queue bound to the timer's routing keys, recording what arrives and when."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, str], str | None]] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        expiration = message.expiration
        self.received.append(
            (
                time.monotonic(),
                message.routing_key or "",
                body,
                None if expiration is None else str(expiration),
            )
        )
        await message.ack()

    def ticks(self, routing_key: str) -> list[str]:
        return [body["tick_id"] for _, key, body, _ in self.received if key == routing_key]


@pytest.fixture
async def tap(amqp_url: str) -> AsyncIterator[tuple[Tap, aio_pika.abc.AbstractQueue]]:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("bangui", "topic", durable=True)
    queue = await channel.declare_queue("test.timer_tap", exclusive=True)
    await queue.bind(exchange, "geo.flush")
    await queue.bind(exchange, "geo.re_resolve")
    recorder = Tap()
    await queue.consume(recorder.on_message)
    yield recorder, queue
    await connection.close()


def start_timer(group: ServiceGroup, name: str) -> ServiceProcess:
    return group.start(
        "timer",
        name,
        GEO_FLUSH_INTERVAL=str(FLUSH),
        GEO_RE_RESOLVE_INTERVAL=str(RE_RESOLVE),
        GEO_LOG_LEVEL="debug",  # each tick is logged at debug
    )


def tick_epochs(ticks: list[str]) -> list[float]:
    return [float(t.split(":", 1)[1]) for t in ticks]


async def test_fixed_cadence_tick_ids_and_ttl(
    amqp_url: str, service_group: ServiceGroup, tap: tuple[Tap, aio_pika.abc.AbstractQueue]
) -> None:
    recorder, _ = tap
    timer = start_timer(service_group, "timer")
    await async_poll(
        lambda: len(recorder.ticks("geo.re_resolve")) >= 2, deadline_s=15, what="two re_resolves"
    )
    assert timer.stop() == 0

    flushes = tick_epochs(recorder.ticks("geo.flush"))
    re_resolves = tick_epochs(recorder.ticks("geo.re_resolve"))
    # Tick k is due at start + k * interval: ids are exactly one interval apart, none repeated.
    assert [round(b - a, 3) for a, b in itertools.pairwise(flushes)] == [FLUSH] * (len(flushes) - 1)
    assert round(re_resolves[1] - re_resolves[0], 3) == RE_RESOLVE
    # The first re-resolve comes one full interval after start: flush ticks 1 and 2 precede it.
    start = flushes[0] - FLUSH
    assert round(re_resolves[0] - start, 3) == RE_RESOLVE
    order = [key for _, key, _, _ in recorder.received]
    assert order.index("geo.re_resolve") >= 2
    # Each command expires after one interval (aio-pika reports the expiration in seconds).
    expirations = {(key, float(exp or 0)) for _, key, _, exp in recorder.received}
    assert expirations == {("geo.flush", FLUSH), ("geo.re_resolve", RE_RESOLVE)}


async def test_stale_commands_expire_instead_of_piling_up(
    amqp_url: str, service_group: ServiceGroup
) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("bangui", "topic", durable=True)
        queue = await channel.declare_queue("test.nobody_consumes", exclusive=True)
        await queue.bind(exchange, "geo.flush")
        timer = start_timer(service_group, "timer")

        def flush_ticks() -> list[dict[str, object]]:
            return [
                e
                for e in timer.log_events()
                if e.get("event") == "timer_tick_published" and e["cadence"] == "flush"
            ]

        # Eight ticks with no consumer, however long a loaded machine takes to start the timer.
        await async_poll(lambda: len(flush_ticks()) >= 8, deadline_s=30, what="eight flush ticks")
        assert timer.stop() == 0
        waiting = await channel.declare_queue("test.nobody_consumes", passive=True)
        count = waiting.declaration_result.message_count
        assert len(flush_ticks()) >= 8
        assert count is not None
        assert count <= 2, f"{count} stale flush commands kept of {len(flush_ticks())} published"
    finally:
        await connection.close()


async def test_one_active_timer_and_takeover(
    amqp_url: str, service_group: ServiceGroup, tap: tuple[Tap, aio_pika.abc.AbstractQueue]
) -> None:
    recorder, _ = tap
    leader = start_timer(service_group, "leader")
    await async_poll(lambda: len(recorder.ticks("geo.flush")) >= 1, deadline_s=10, what="a tick")
    standby = start_timer(service_group, "standby")
    await async_poll(
        lambda: any(e.get("event") == "timer_standby_waiting" for e in standby.log_events()),
        deadline_s=10,
        what="second timer to wait as standby",
    )
    before = len(recorder.ticks("geo.flush"))
    await asyncio.sleep(FLUSH * 6)
    during = recorder.ticks("geo.flush")[before:]
    epochs = tick_epochs(during)
    # One stream: consecutive ids one interval apart, never two commands for one interval.
    assert len(during) >= 4
    assert [round(b - a, 3) for a, b in itertools.pairwise(epochs)] == [FLUSH] * (len(epochs) - 1)

    leader.kill()  # SIGKILL: the broker drops its exclusive lock queue with the connection
    killed_at = time.monotonic()
    count = len(recorder.received)
    await async_poll(
        lambda: any(e.get("event") == "timer_leading" for e in standby.log_events()),
        deadline_s=10,
        what="standby takes over",
    )
    await async_poll(lambda: len(recorder.received) > count, deadline_s=10, what="ticks resume")
    resumed_after = recorder.received[count][0] - killed_at
    assert resumed_after < 5.0
    assert standby.stop() == 0


async def test_a_leader_cut_off_steps_down_when_it_finds_another_leading(
    amqp_url: str,
    broker_admin: BrokerAdmin,
    service_group: ServiceGroup,
    tap: tuple[Tap, aio_pika.abc.AbstractQueue],
) -> None:
    """The broker drops the lock with the leader's connection; a standby takes it. When the old
    leader's connection comes back it must not fight for the lock (a restore of the exclusive
    queue would fail its every reconnect) nor tick alongside: it becomes the standby."""
    recorder, _ = tap
    first = start_timer(service_group, "first")
    await async_poll(lambda: len(recorder.ticks("geo.flush")) >= 1, deadline_s=10, what="a tick")
    second = start_timer(service_group, "second")
    await async_poll(
        lambda: has_event(second, "timer_standby_waiting"), deadline_s=10, what="second on standby"
    )

    assert first.process is not None
    first.process.send_signal(signal.SIGSTOP)  # so it cannot reconnect before second leads
    try:
        name = timer_connection_name(first)
        await async_poll(  # the management API lists a new connection within its stats interval
            lambda: broker_admin.close_connections(name) == 1,
            deadline_s=15,
            what=f"connection {name!r} listed and closed",
        )
        await async_poll(
            lambda: has_event(second, "timer_leading"), deadline_s=10, what="second takes over"
        )
    finally:
        first.process.send_signal(signal.SIGCONT)
    await async_poll(
        lambda: has_event(first, "amqp_connection_restored"), deadline_s=20, what="first reconnects"
    )
    await async_poll(
        lambda: has_event(first, "timer_leadership_lost"), deadline_s=10, what="first steps down"
    )
    await async_poll(
        lambda: has_event(first, "timer_standby_waiting"),
        deadline_s=10,
        what="first on standby",
    )
    assert first.running
    assert "RESOURCE_LOCKED" not in first.log_path.read_text()  # no reconnect fighting the lock

    # From the step-down on, one stream: every tick a whole number of intervals after the one
    # before (a tick skipped under load is fine), never a second timer's ticks in between.
    since = len(recorder.ticks("geo.flush"))
    await async_poll(
        lambda: len(recorder.ticks("geo.flush")) >= since + 6,
        deadline_s=10,
        what="six more flush ticks",
    )
    assert one_stream(tick_epochs(recorder.ticks("geo.flush")[since:]))

    second.kill()  # and the stepped-down timer is a working standby
    count = len(recorder.received)
    await async_poll(
        lambda: len(events(first, "timer_leading")) >= 2, deadline_s=10, what="first leads again"
    )
    await async_poll(lambda: len(recorder.received) > count, deadline_s=10, what="ticks resume")
    assert first.stop() == 0


def one_stream(epochs: list[float]) -> bool:
    """Ascending tick times, each a whole number (>= 1) of flush intervals after the last."""
    steps = [(b - a) / FLUSH for a, b in itertools.pairwise(epochs)]
    return all(step >= 0.999 and abs(step - round(step)) < 0.01 for step in steps)


def events(process: ServiceProcess, name: str) -> list[dict[str, object]]:
    return [e for e in process.log_events() if e.get("event") == name]


def has_event(process: ServiceProcess, name: str) -> bool:
    return bool(events(process, name))


def timer_connection_name(process: ServiceProcess) -> str:
    assert process.process is not None
    return f"bangui-geo timer@{socket.gethostname()}:{process.process.pid}"


async def test_a_healthy_timer_is_quiet_at_info(
    amqp_url: str, service_group: ServiceGroup, tap: tuple[Tap, aio_pika.abc.AbstractQueue]
) -> None:
    """Ticks go to debug; at info a timer says it leads and then one summary line per cadence
    and minute, not a line per tick."""
    recorder, _ = tap
    timer = service_group.start("timer", "quiet", GEO_FLUSH_INTERVAL="0.05", GEO_LOG_LEVEL="info")
    await async_poll(
        lambda: len(recorder.ticks("geo.flush")) >= 40, deadline_s=20, what="40 flush commands"
    )
    assert timer.stop() == 0
    names = [e["event"] for e in timer.log_events()]
    assert "timer_tick_published" not in names
    summaries = [e for e in timer.log_events() if e["event"] == "timer_ticks_summarized"]
    assert [(e["cadence"], e["published"], e["failed"]) for e in summaries] == [("flush", 1, 0)]
    assert len(names) < 15, names
