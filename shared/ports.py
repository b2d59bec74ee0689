"""The small interfaces services see instead of AMQP objects, so handlers run against fakes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel


class Publisher(Protocol):
    """Publishes models on the ``bangui`` exchange; returns once the broker confirmed them all."""

    async def publish(
        self,
        routing_key: str,
        messages: Sequence[BaseModel],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """``mandatory=False`` for events nobody may be listening to (e.g. ``ip.resolved``)."""
        ...

    async def publish_bodies(
        self,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """Already-serialized bodies, for hot paths that build their JSON once."""
        ...


class Ticket(Protocol):
    """A delivery whose ack the handler postpones until its effect is durable downstream.

    Opaque to handlers: they only hold it and hand it back to the ``Acker``.
    """


class Acker(Protocol):
    """Settles postponed deliveries once their effect is durable."""

    async def ack(self, tickets: Sequence[Ticket]) -> None: ...
