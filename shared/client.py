"""The publisher client for other BanGUI components: connect once, then ``publish_seen`` IPs.

Addresses are validated and normalized here with the same ``IpSeen`` model the resolver uses, so
a bad one raises ``ValueError`` before anything is sent instead of ending in ``geo.dead_letter``.
Lists longer than a message may carry are split; every message is persistent and confirmed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from pydantic import ValidationError

from shared import topology
from shared.amqp import BrokerError, BrokerUnreachable, ExchangePublisher, PublishFailed
from shared.messages import MAX_IPS_PER_MESSAGE, IpSeen

__all__ = ["BrokerError", "BrokerUnreachable", "GeoPublisher", "PublishFailed", "ip_seen_bodies"]

CONNECT_TIMEOUT = 10.0
CONFIRM_TIMEOUT = 10.0


class GeoPublisher:
    """Publishes ``ip.seen`` on the ``bangui`` exchange over one connection.

    ``async with GeoPublisher.connect(url) as geo: await geo.publish_seen("1.2.3.4")``, or
    ``geo = await GeoPublisher.open(url)`` ... ``await geo.close()`` for a long-lived holder.
    The connection is robust: after a broker restart it reconnects in the background, and a
    publish that fails meanwhile raises ``PublishFailed`` (the caller decides to retry).
    """

    def __init__(self, publisher: ExchangePublisher) -> None:
        self._publisher = publisher

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> GeoPublisher:
        """Connect with one attempt; raise ``BrokerUnreachable`` saying why it failed."""
        publisher = await ExchangePublisher.open(
            url, connect_timeout=connect_timeout, confirm_timeout=confirm_timeout
        )
        return cls(publisher)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> AsyncIterator[GeoPublisher]:
        geo = await cls.open(url, connect_timeout=connect_timeout, confirm_timeout=confirm_timeout)
        try:
            yield geo
        finally:
            await geo.close()

    async def publish_seen(
        self,
        ips: str | Iterable[str],
        *,
        source: str | None = None,
        jail: str | None = None,
        seen_at: datetime | None = None,
    ) -> int:
        """Publish one IP, or any number (split into messages of at most 1000); returns how
        many addresses were published. Returns once the broker confirmed every message.

        Raises ``ValueError`` naming the first bad address (nothing is published then) and
        ``PublishFailed`` when the broker did not confirm.
        """
        messages = _ip_seen_messages(ips)
        extra = _extra_fields(source=source, jail=jail, seen_at=seen_at)
        await self._publisher.publish(topology.IP_SEEN, [_body(m, extra) for m in messages])
        return sum(len(m.addresses) for m in messages)

    async def close(self) -> None:
        await self._publisher.close()


def ip_seen_bodies(
    ips: str | Iterable[str],
    *,
    source: str | None = None,
    jail: str | None = None,
    seen_at: datetime | None = None,
) -> list[bytes]:
    """The ``ip.seen`` bodies for ``ips``: ``{"ip": ...}`` for one string, ``{"ips": [...]}``
    chunks of at most 1000 for an iterable (none for an empty one), with the optional fields."""
    extra = _extra_fields(source=source, jail=jail, seen_at=seen_at)
    return [_body(m, extra) for m in _ip_seen_messages(ips)]


def _ip_seen_messages(ips: str | Iterable[str]) -> list[IpSeen]:
    if isinstance(ips, str):
        return [_validated({"ip": ips}, offset=0)]
    values = list(ips)
    return [
        _validated({"ips": values[start : start + MAX_IPS_PER_MESSAGE]}, offset=start)
        for start in range(0, len(values), MAX_IPS_PER_MESSAGE)
    ]


def _extra_fields(
    *, source: str | None, jail: str | None, seen_at: datetime | None
) -> dict[str, str]:
    """The optional context fields the contract allows (the services ignore them)."""
    extra: dict[str, str] = {}
    if source is not None:
        extra["source"] = source
    if jail is not None:
        extra["jail"] = jail
    if seen_at is not None:
        if seen_at.tzinfo is None:
            raise ValueError("seen_at must be timezone-aware (e.g. datetime.now(UTC))")
        extra["seen_at"] = seen_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return extra


def _validated(fields: dict[str, object], *, offset: int) -> IpSeen:
    try:
        return IpSeen.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        message = error["msg"].removeprefix("Value error, ")
        where = _position(error["loc"], offset)
        raise ValueError(f"{where}: {message}" if where else message) from None


def _position(loc: Sequence[int | str], offset: int) -> str:
    if len(loc) >= 2 and loc[0] == "ips" and isinstance(loc[1], int):
        return f"ips[{offset + loc[1]}]"
    return "ip" if loc and loc[0] == "ip" else ""


def _body(seen: IpSeen, extra: dict[str, str]) -> bytes:
    fields: dict[str, object] = {"ip": seen.ip} if seen.ip is not None else {"ips": seen.ips}
    return json.dumps({**fields, **extra}, separators=(",", ":")).encode()
