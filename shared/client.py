"""The clients for other BanGUI components: ``GeoPublisher`` publishes ``ip.seen``, and
``GeoClient`` asks the resolver (``geo.lookup``) and waits for the answer.

Addresses are validated and normalized here with the same ``IpSeen`` model the resolver uses, so
a bad one raises ``ValueError`` before anything is sent instead of ending in ``geo.dead_letter``.
Lists longer than a message may carry are split; every message is persistent and confirmed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from pydantic import ValidationError

from shared import topology
from shared.amqp import BrokerError, BrokerUnreachable, ExchangePublisher, PublishFailed
from shared.amqp.requests import Requester
from shared.messages import (
    MAX_IPS_PER_MESSAGE,
    MAX_LOOKUP_TIMEOUT_MS,
    GeoLookupReply,
    GeoLookupRequest,
    IpSeen,
    LookupRow,
    RequestError,
)

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "GeoClient",
    "GeoPublisher",
    "LookupFailed",
    "LookupRow",
    "PublishFailed",
    "ip_seen_bodies",
]

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


class LookupFailed(BrokerError):
    """No resolver answered a ``geo.lookup`` in time, or it refused the request."""


# Beyond the request's own timeout, how long the client waits for the reply's trip back.
REPLY_SLACK_S = 1.0


class GeoClient:
    """Asks the resolver over the broker: ``rows = await geo.lookup(["203.0.113.7"])``.

    Replies come back by RabbitMQ's direct reply-to, so a publish-only user
    (``bangui-publisher``) can ask, and nothing is declared. Rows are ``LookupRow`` tuples in
    request order; an address not answered within ``timeout`` has the resolution ``pending``.
    """

    def __init__(self, publisher: ExchangePublisher, requester: Requester) -> None:
        self._publisher = publisher
        self._requester = requester

    @classmethod
    async def open(cls, url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> GeoClient:
        """Connect with one attempt; raise ``BrokerUnreachable`` saying why it failed."""
        publisher = await ExchangePublisher.open(
            url, connect_timeout=connect_timeout, confirm_timeout=CONFIRM_TIMEOUT
        )
        try:
            requester = await Requester.open(publisher.connection)
        except BaseException:
            await publisher.close()
            raise
        return cls(publisher, requester)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, *, connect_timeout: float = CONNECT_TIMEOUT
    ) -> AsyncIterator[GeoClient]:
        geo = await cls.open(url, connect_timeout=connect_timeout)
        try:
            yield geo
        finally:
            await geo.close()

    async def lookup(
        self,
        ips: str | Iterable[str],
        *,
        timeout: float = 2.0,  # noqa: ASYNC109 - the request's own deadline, sent to the resolver
    ) -> list[LookupRow]:
        """The rows for ``ips`` (any number, asked 1000 at a time, concurrently), in order.

        Raises ``ValueError`` naming a bad address before anything is sent, and
        ``LookupFailed`` when no resolver answered within ``timeout`` plus a second.
        """
        values = [ips] if isinstance(ips, str) else list(ips)
        timeout_ms = max(1, min(MAX_LOOKUP_TIMEOUT_MS, round(timeout * 1000)))
        requests = [
            _lookup_request(values[start : start + MAX_IPS_PER_MESSAGE], timeout_ms, start)
            for start in range(0, len(values), MAX_IPS_PER_MESSAGE)
        ]
        replies = await asyncio.gather(
            *(self._ask(request, timeout_ms / 1000 + REPLY_SLACK_S) for request in requests)
        )
        return [row for reply in replies for row in reply]

    async def _ask(self, request: GeoLookupRequest, wait: float) -> list[LookupRow]:
        body = request.model_dump_json().encode()
        reply = await self._requester.request(topology.LOOKUP, body, wait)
        if reply is None:
            raise LookupFailed(f"no resolver answered geo.lookup within {wait:.1f} s")
        try:
            return list(GeoLookupReply.model_validate_json(reply).rows)
        except ValidationError:
            try:
                error = RequestError.model_validate_json(reply).error
            except ValidationError:
                error = f"unreadable reply: {reply[:200]!r}"
            raise LookupFailed(f"geo.lookup refused: {error}") from None

    async def close(self) -> None:
        await self._requester.close()
        await self._publisher.close()


def _lookup_request(ips: list[str], timeout_ms: int, offset: int) -> GeoLookupRequest:
    try:
        return GeoLookupRequest(ips=ips, timeout_ms=timeout_ms)
    except ValidationError as exc:
        raise _bad_address(exc, offset) from None


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
        raise _bad_address(exc, offset) from None


def _bad_address(exc: ValidationError, offset: int) -> ValueError:
    """The ``ValueError`` a caller sees for a refused request: the model's first error, with
    where it is (``ips[N]`` counted from the whole list, ``offset`` being this chunk's start)."""
    error = exc.errors(include_url=False)[0]
    message = error["msg"].removeprefix("Value error, ")
    where = _position(error["loc"], offset)
    return ValueError(f"{where}: {message}" if where else message)


def _position(loc: Sequence[int | str], offset: int) -> str:
    if len(loc) >= 2 and loc[0] == "ips" and isinstance(loc[1], int):
        return f"ips[{offset + loc[1]}]"
    return "ip" if loc and loc[0] == "ip" else ""


def _body(seen: IpSeen, extra: dict[str, str]) -> bytes:
    fields: dict[str, object] = {"ip": seen.ip} if seen.ip is not None else {"ips": seen.ips}
    return json.dumps({**fields, **extra}, separators=(",", ":")).encode()
