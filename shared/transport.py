"""What a service's composition root needs of its broker, as a protocol: the real ``Amqp`` and
the in-memory transport (``shared.amqp.memory``) both satisfy it, so the bootstraps run
unchanged on either, and one pipeline test runs at two speeds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.amqp import Amqp, AmqpConfig
from shared.metrics import Health, MetricsRegistry
from shared.ports import Publisher, Ticket
from shared.routes import Wiring


class Requests(Protocol):
    """Request/reply: the reply's body, or None when none came within ``wait`` seconds."""

    async def request(
        self, routing_key: str, body: bytes, wait: float, *, expire: bool = True
    ) -> bytes | None: ...


class Transport(Protocol):
    @property
    def publisher(self) -> Publisher: ...

    async def consume(self, wiring: Wiring, *, prefetch: int) -> None:
        """Start a consumer per wired route of the table (``prefetch`` where it names none)."""
        ...

    async def requester(self) -> Requests: ...

    async def ack(self, tickets: Sequence[Ticket]) -> None: ...

    def health(self) -> Health: ...

    def register_metrics(self, registry: MetricsRegistry) -> None: ...

    async def stop_consuming(self, drain_timeout: float) -> None: ...

    async def try_lead(self, lock_name: str) -> bool:
        """Become, or check that we still are, the one holder of ``lock_name`` (the timer's)."""
        ...

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the connection has been restored."""
        ...

    async def close(self) -> None:
        """Close everything; raises ``ServiceFault`` if the service stopped on a lost topology."""
        ...


class OpenTransport(Protocol):
    """Connects ``service`` and makes sure the topology is there; later losses set ``stop``."""

    async def __call__(
        self, config: AmqpConfig, *, service: str, stop: asyncio.Event
    ) -> Transport: ...


async def open_amqp(config: AmqpConfig, *, service: str, stop: asyncio.Event) -> Transport:
    """The real broker, from ``GEO_AMQP_URL``."""
    return await Amqp.open(config, service=service, stop=stop)
