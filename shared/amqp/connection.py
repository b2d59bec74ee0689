"""Connecting to the broker (bounded retries, failover across a list of nodes), channels, the
topology declaration, and the one-attempt connect of tools and other components."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import ChannelPreconditionFailed, InvalidFrameError

from shared import topology
from shared.errors import SettingRefused, TopologyMismatch
from shared.settings import split_amqp_urls

log = structlog.get_logger("shared.amqp")

CONNECT_ATTEMPTS = 30
VHOST_ATTEMPTS = 12  # about 20 s of a vhost refused at open before it counts as a bad setting
CONNECT_DELAY_MAX = 2.0


async def connect(
    url: str, *, attempts: int = CONNECT_ATTEMPTS, name: str | None = None
) -> AbstractRobustConnection:
    """Connect with a bounded number of retries, so any start order of broker and services works.

    ``url`` may list several nodes of one cluster, comma-separated (``GEO_AMQP_URL``): each
    attempt tries them in order, and the connection then fails over to the next node in turn
    whenever it loses its own (``_Failover``). A single URL behaves as it always did. ``name``
    is shown as the connection's client-provided name in the management UI.
    """
    properties: dict[str, Any] = {"connection_name": name} if name else {}
    urls = split_amqp_urls(url)
    delay = 0.2
    for attempt in range(1, attempts + 1):
        errors: list[str] = []
        refusals: list[str] = []
        for index, candidate in enumerate(urls):
            try:
                connection = await aio_pika.connect_robust(
                    candidate, timeout=10, client_properties=properties
                )
            except ProbableAuthenticationError as exc:
                # A wrong password does not pass with time: say so now, not after thirty
                # attempts. (Once running, the robust connection retries anything.)
                refusals.append(f"{_refused(exc, candidate)} at {_endpoint(candidate)}")
                continue
            except InvalidFrameError as exc:
                # Connection.Close for Connection.Open: no such vhost, or no right to it; or a
                # cluster node that has just joined and not started the vhost yet. Retried for a
                # while, then final.
                if attempt >= VHOST_ATTEMPTS:
                    refusals.append(f"{_refused(exc, candidate)} at {_endpoint(candidate)}")
                else:
                    errors.append(f"{_endpoint(candidate)}: {_refused(exc, candidate)}")
                continue
            # AMQPError, not only AMQPConnectionError: whatever else a node says while it is not
            # ready is a node not ready yet, like a refused port.
            except (TimeoutError, AMQPError, OSError) as exc:
                if attempt == attempts and index == len(urls) - 1 and not refusals:
                    raise
                error = str(exc) or repr(exc)
                errors.append(error if len(urls) == 1 else f"{_endpoint(candidate)}: {error}")
                continue
            connection.reconnect_callbacks.add(_log_reconnect)
            connection.close_callbacks.add(_log_lost)
            if len(urls) > 1:
                connection.close_callbacks.add(_Failover(urls, index))
            log.info("amqp_connected", attempt=attempt, broker=_endpoint(candidate))
            return connection
        if refusals:
            raise SettingRefused("GEO_AMQP_URL", "; ".join(refusals))
        log.warning(
            "amqp_connect_failed", attempt=attempt, retry_in_s=delay, error="; ".join(errors)
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, CONNECT_DELAY_MAX)
    raise AssertionError("unreachable")


@dataclass(eq=False)  # hashed by identity: aio-pika keeps callbacks in a set
class _Failover:
    """Points a robust connection at the next node of its list each time its node is lost or
    refuses a reconnect attempt, round robin: any node of a cluster serves every queue.

    aio-pika's robust connection reconnects to its one URL (``connection.url``, read at each
    attempt); it calls the close callbacks on every loss and on every failed attempt, before it
    schedules the next attempt. Channels, queues, bindings and consumers are then restored on
    the new node as after any reconnect.
    """

    urls: tuple[str, ...]
    index: int

    def __call__(self, connection: Any, _exc: BaseException | None = None) -> None:
        if not isinstance(connection, aio_pika.RobustConnection) or connection.close_called:
            return  # closed on purpose: nothing to fail over to
        self.index = (self.index + 1) % len(self.urls)
        connection.url = make_url(self.urls[self.index])
        log.warning("amqp_broker_switched", broker=_endpoint(self.urls[self.index]))


def _endpoint(url: str) -> str:
    """host:port/vhost of a broker URL, for logs: no user, no password."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return f"{_host(parts.hostname or 'localhost')}:{parts.port or default}{parts.path or '/'}"


def connection_name(service: str) -> str:
    """How the management UI lists a service's connection: which service, on which host, which
    process (``bangui-geo resolver@web-1:4711``), so an operator can tell replicas apart."""
    return f"bangui-geo {service}@{socket.gethostname()}:{os.getpid()}"


def _host(hostname: str) -> str:
    """``hostname`` as a URL writes it: an IPv6 address back in its brackets."""
    return f"[{hostname}]" if ":" in hostname else hostname


def _log_reconnect(connection: Any) -> None:
    url = getattr(connection, "url", None)
    log.warning("amqp_connection_restored", broker=_endpoint(str(url)) if url else None)


def _log_lost(_connection: Any, exc: BaseException | None = None) -> None:
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        log.warning("amqp_connection_lost", error=str(exc) or repr(exc))


async def open_channel(connection: AbstractRobustConnection, prefetch: int = 0) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


async def declare_topology(
    channel: AbstractChannel, queue_type: topology.QueueType = "classic"
) -> dict[str, AbstractQueue]:
    """Declare exchanges, queues and bindings; safe to run from every service at every start."""
    exchange = await channel.declare_exchange(topology.EXCHANGE, ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(
        topology.DEAD_LETTER_EXCHANGE, ExchangeType.TOPIC, durable=True
    )
    queues: dict[str, AbstractQueue] = {}
    for spec, source in [(q, exchange) for q in topology.WORK_QUEUES] + [
        (topology.DEAD_LETTER, dlx)
    ]:
        arguments = spec.declare_arguments(queue_type)
        try:
            queue = await channel.declare_queue(
                spec.name, durable=True, arguments=arguments or None
            )
        except ChannelPreconditionFailed as exc:
            raise TopologyMismatch(
                f"queue {spec.name} exists with other arguments than this version declares "
                f"({arguments or 'none'}): {exc.args[0] if exc.args else exc}; drain and delete "
                f"it (rabbitmqctl delete_queue -p <vhost> {spec.name}), then start again"
            ) from None
        for key in spec.routing_keys:
            await queue.bind(source, routing_key=key)
        queues[spec.name] = queue
    return queues


def json_message(body: bytes, *, expiration: float | None, headers: dict[str, Any] | None) -> Any:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
        headers=headers,
    )


async def close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except Exception as exc:  # closing is best effort: the connection goes next
        log.debug("amqp_channel_close_failed", error=repr(exc))


class BrokerError(Exception):
    """A broker operation of a tool failed; the message says what and why, in one line."""


class BrokerUnreachable(BrokerError):
    """One connection attempt failed; the message names the broker (password hidden) and why.
    ``refused``: the broker answered and refused the login or the vhost, a bad setting rather
    than an outage."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class PublishFailed(BrokerError):
    """A publish was not confirmed (no answer, refused, unroutable or the connection was lost)."""


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{_host(parts.hostname or '')}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _refused(exc: BaseException, url: str) -> str:
    if isinstance(exc, ProbableAuthenticationError):
        user = unquote(urlsplit(url).username or "guest")
        if "@" in user:
            # 'amqp://geo@S3cr3t@host': an '@' typed for ':' puts the password in the name.
            return (
                f"the broker refused the login of user {user.partition('@')[0]!r}... (the user "
                "part holds an '@': write user:password, and percent-encode an '@' as %40)"
            )
        return f"the broker refused the login of user {user!r} (wrong user or password)"
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    return f"the broker refused vhost {vhost!r} (it does not exist, or the user may not use it)"


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ProbableAuthenticationError):
        return "login refused (check the user and password)"
    text = str(exc) or repr(exc)
    if "Connection.Close" in text:  # refused at connection.open: unknown vhost or no access
        return "connection refused at open (does the vhost exist, may this user use it?)"
    return text


async def connect_once(url: str, *, connect_timeout: float) -> AbstractRobustConnection:
    """Connect with a single attempt (no retry loop: a tool should fail fast and say why).

    ``url`` may list several nodes of a cluster, comma-separated: each gets one attempt, in
    order. The connection is robust, so a long-lived client recovers from a broker restart
    later (failing over to the next node, given a list).
    """
    urls = split_amqp_urls(url)
    reasons: list[str] = []
    refused = 0
    for index, candidate in enumerate(urls):
        try:
            connection = await aio_pika.connect_robust(candidate, timeout=connect_timeout)
        except (TimeoutError, AMQPError, OSError) as exc:
            why = _why(exc, connect_timeout)
            refused += isinstance(exc, ProbableAuthenticationError | InvalidFrameError)
            reasons.append(f"cannot connect to the broker at {redacted(candidate)}: {why}")
            continue
        if len(urls) > 1:
            connection.close_callbacks.add(_Failover(urls, index))
        return connection
    raise BrokerUnreachable("; ".join(reasons), refused=refused == len(urls))
