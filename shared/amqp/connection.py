"""Connecting to the broker (bounded retries, failover across a list of nodes), channels, and
the one-attempt connect of tools and other components."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPError,
    ProbableAuthenticationError,
)
from aiormq.exceptions import InvalidFrameError

from shared.errors import SettingRefused
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
        connection, index, failures = await _try_nodes(
            urls, connect_timeout=10, properties=properties
        )
        if connection is not None:
            connection.reconnect_callbacks.add(_log_reconnect)
            connection.close_callbacks.add(_log_lost)
            log.info("amqp_connected", attempt=attempt, broker=_endpoint(urls[index]))
            return connection
        errors: list[str] = []
        refusals: list[str] = []
        for candidate, exc in failures:
            if isinstance(exc, ProbableAuthenticationError) or (
                # Connection.Close for Connection.Open: no such vhost, or no right to it; or a
                # cluster node that has just joined and not started the vhost yet. Retried for
                # a while, then final.
                isinstance(exc, InvalidFrameError) and attempt >= VHOST_ATTEMPTS
            ):
                # A wrong password does not pass with time: say so now, not after thirty
                # attempts. (Once running, the robust connection retries anything.)
                refusals.append(f"{_refused(exc, candidate)} at {_endpoint(candidate)}")
            elif isinstance(exc, InvalidFrameError):
                errors.append(f"{_endpoint(candidate)}: {_refused(exc, candidate)}")
            else:
                # AMQPError, not only AMQPConnectionError: whatever else a node says while it
                # is not ready is a node not ready yet, like a refused port.
                error = str(exc) or repr(exc)
                errors.append(error if len(urls) == 1 else f"{_endpoint(candidate)}: {error}")
        if refusals:
            raise SettingRefused("GEO_AMQP_URL", "; ".join(refusals))
        if attempt == attempts:
            raise failures[-1][1]
        log.warning(
            "amqp_connect_failed", attempt=attempt, retry_in_s=delay, error="; ".join(errors)
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, CONNECT_DELAY_MAX)
    raise AssertionError("unreachable")


async def _try_nodes(
    urls: tuple[str, ...], *, connect_timeout: float, properties: dict[str, Any] | None = None
) -> tuple[AbstractRobustConnection | None, int, list[tuple[str, BaseException]]]:
    """One attempt at each node in order: the first connection (set to fail over along
    ``urls``) and its index, or None and why each node failed. The one loop of ``connect``
    (which retries it) and ``connect_once`` (which does not)."""
    failures: list[tuple[str, BaseException]] = []
    for index, candidate in enumerate(urls):
        try:
            connection = await aio_pika.connect_robust(
                candidate, timeout=connect_timeout, client_properties=properties
            )
        except (TimeoutError, AMQPError, OSError) as exc:
            failures.append((candidate, exc))
            continue
        if len(urls) > 1:
            connection.close_callbacks.add(_Failover(urls, index))
        return connection, index, failures
    return None, -1, failures


@dataclass(eq=False)  # hashed by identity: aio-pika keeps callbacks in a set
class _Failover:
    """Points a robust connection at the next node of its list each time its node is lost or
    refuses a reconnect attempt, round robin: any node of a cluster serves every queue.

    aio-pika's robust connection reconnects to its one URL (``retarget`` changes it); it calls
    the close callbacks on every loss and on every failed attempt, before it schedules the next
    attempt. Channels, queues, bindings and consumers are then restored on
    the new node as after any reconnect.

    A connection whose channels could not be restored gets the callbacks twice for one failure
    (once from the restore, once as its transport closes with the same error): the second call
    must not move on again, or a list of two nodes would retry the failing node forever.
    """

    urls: tuple[str, ...]
    index: int
    _last_error: BaseException | None = field(default=None, repr=False)

    def __call__(self, connection: Any, exc: BaseException | None = None) -> None:
        if not isinstance(connection, aio_pika.RobustConnection) or connection.close_called:
            return  # closed on purpose: nothing to fail over to
        if exc is not None and exc is self._last_error:
            return  # the same failure, told again
        self._last_error = exc
        self.index = (self.index + 1) % len(self.urls)
        retarget(connection, self.urls[self.index])
        log.warning("amqp_broker_switched", broker=_endpoint(self.urls[self.index]))


def retarget(connection: aio_pika.RobustConnection, url: str) -> None:
    """Point a robust connection's next reconnect attempts at ``url``.

    aio-pika 10 has no public way to: each attempt (``Connection.connect``) connects to the
    connection's ``url`` attribute, which only ``update_secret`` changes, and for the password
    alone. So this writes that attribute, here only; tests/unit/test_failover.py fails if
    aio-pika stops reading it.
    """
    connection.url = make_url(url)


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
    connection, _, failures = await _try_nodes(urls, connect_timeout=connect_timeout)
    if connection is not None:
        return connection
    reasons = [
        f"cannot connect to the broker at {redacted(candidate)}: {_why(exc, connect_timeout)}"
        for candidate, exc in failures
    ]
    refused = sum(
        isinstance(exc, ProbableAuthenticationError | InvalidFrameError) for _, exc in failures
    )
    raise BrokerUnreachable("; ".join(reasons), refused=refused == len(urls))
