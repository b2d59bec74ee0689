"""What a two-speed pipeline test sees of its broker: the in-memory one, or a real RabbitMQ vhost.

Either way the services run in-process through their real bootstraps (``run(settings, stop,
transport=...)``) on one event loop; the test publishes, reads ``geo.dead_letter`` and asks
requests as any component would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aio_pika

from bangui_geo.testing import drain_queue, read_rows, wait_for_topology
from services.persistence import bootstrap as persistence
from services.persistence.stores import open_repository
from services.resolver import bootstrap as resolver
from services.timer import bootstrap as timer
from shared import topology
from shared.amqp.memory import MemoryBroker, MemoryRequester
from shared.amqp.requests import Requester
from shared.settings import Settings
from shared.transport import OpenTransport, open_amqp

Body = bytes | Mapping[str, Any]


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    headers: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.headers[topology.REASON_HEADER])


def encoded(body: Body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


class Broker(Protocol):
    name: str
    amqp_url: str

    @property
    def open(self) -> OpenTransport:
        """What the bootstraps connect with."""
        ...

    async def ready(self) -> None:
        """Wait until the topology is declared (a service has started)."""

    async def send(
        self, routing_key: str, bodies: list[Body], *, headers: dict[str, Any] | None = None
    ) -> None: ...

    async def dead_letters(self) -> list[DeadLetter]:
        """Everything in geo.dead_letter now, taken from it."""

    async def request(self, routing_key: str, body: bytes, wait: float) -> bytes | None: ...

    async def bounce(self, queue: str) -> bool:
        """Take the first message of ``queue`` and requeue it, redelivered, as a consumer whose
        connection dropped mid-way would; False while the queue is empty."""

    async def run_timer(self, settings: Settings, stop: asyncio.Event) -> None: ...


@dataclass
class InMemory:
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    name: str = "memory"
    amqp_url: str = "amqp://guest:guest@memory/"

    @property
    def open(self) -> OpenTransport:
        return self.broker.open

    async def ready(self) -> None:
        pass  # declared when the broker is made

    async def send(
        self, routing_key: str, bodies: list[Body], *, headers: dict[str, Any] | None = None
    ) -> None:
        for body in bodies:
            self.broker.send(routing_key, encoded(body), headers=headers)

    async def dead_letters(self) -> list[DeadLetter]:
        taken = self.broker.take(topology.DEAD_LETTER_QUEUE)
        return [DeadLetter(e.body, e.headers) for e in taken]

    async def request(self, routing_key: str, body: bytes, wait: float) -> bytes | None:
        return await MemoryRequester(self.broker).request(routing_key, body, wait)

    async def bounce(self, queue: str) -> bool:
        ready = self.broker.queues[queue].ready
        if not ready:
            return False
        envelope = ready.popleft()
        self.broker.settle_negatively(self.broker.queues[queue], envelope, requeue=True)
        return True

    async def run_timer(self, settings: Settings, stop: asyncio.Event) -> None:
        await timer.run(settings, stop, transport=self.broker.open)


@dataclass
class RabbitMq:
    amqp_url: str
    name: str = "rabbitmq"

    @property
    def open(self) -> OpenTransport:
        return open_amqp

    async def ready(self) -> None:
        await wait_for_topology(self.amqp_url)

    async def send(
        self, routing_key: str, bodies: list[Body], *, headers: dict[str, Any] | None = None
    ) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.EXCHANGE)
            for body in bodies:
                message = aio_pika.Message(encoded(body), headers=headers)
                await exchange.publish(message, routing_key)

    async def dead_letters(self) -> list[DeadLetter]:
        taken = await drain_queue(self.amqp_url, topology.DEAD_LETTER_QUEUE)
        return [DeadLetter(m.body, dict(m.headers or {})) for m in taken]

    async def request(self, routing_key: str, body: bytes, wait: float) -> bytes | None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            requester = await Requester.open(connection)
            try:
                return await requester.request(routing_key, body, wait)
            finally:
                await requester.close()

    async def bounce(self, queue: str) -> bool:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            handle = await channel.get_queue(queue, ensure=False)
            message = await handle.get(fail=False, no_ack=False)
            if message is None:
                return False
            await message.nack(requeue=True)
            return True

    async def run_timer(self, settings: Settings, stop: asyncio.Event) -> None:
        await timer.run(settings, stop)


Store = Callable[[Settings], Awaitable[Any]]


@dataclass
class Pipeline:
    """The services of one test, each a task running its bootstrap, stopped by its event."""

    broker: Broker
    tmp_path: Path
    running: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.tmp_path / "db" / "geo_cache.sqlite3"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": self.broker.amqp_url,
            "db_path": self.db_path,
            "flush_interval": 0.3,
            "re_resolve_interval": 60,
            "drain_timeout": 2,
        }
        values.update(overrides)
        return Settings(**values)

    def start(self, name: str, *, store: Store = open_repository, **overrides: Any) -> None:
        settings, stop = self.settings(**overrides), asyncio.Event()
        body: Awaitable[None]
        if name == "resolver":
            body = resolver.run(settings, stop, transport=self.broker.open)
        elif name == "persistence":
            body = persistence.run(settings, stop, transport=self.broker.open, store=store)
        else:
            body = self.broker.run_timer(settings, stop)
        self.running[name] = (asyncio.create_task(body, name=name), stop)

    def rows(self) -> dict[str, tuple[Any, ...]]:
        return read_rows(self.db_path)

    def check_running(self) -> None:
        for name, (task, _) in self.running.items():
            if task.done():
                raise AssertionError(f"{name} stopped: {task.exception()!r}")

    async def stop(self, name: str) -> None:
        task, stop = self.running.pop(name)
        stop.set()
        await asyncio.wait_for(task, 10)  # raises what the service raised

    async def stop_all(self) -> None:
        for name in ["timer", "resolver", "persistence"]:
            if name in self.running:
                await self.stop(name)

    async def kill_all(self) -> None:
        for task, stop in self.running.values():
            stop.set()
            task.cancel()
            with suppress(BaseException):
                await task
