"""Failing over between the nodes listed in ``GEO_AMQP_URL``, without a broker: each loss of
the connection (or failed reconnect attempt) points aio-pika's robust connection at the next
node, round robin; a deliberate close points it nowhere new."""

from __future__ import annotations

import inspect

import aio_pika
import aio_pika.abc
import pytest
from aio_pika.connection import make_url

from shared.amqp.connection import _endpoint, _Failover, redacted, retarget

NODES = (
    "amqp://geo:secret@rabbit-a:5672/bangui",
    "amqp://geo:secret@rabbit-b:5673/bangui",
    "amqp://geo:secret@rabbit-c:5674/bangui",
)


async def test_each_loss_points_the_robust_connection_at_the_next_node() -> None:
    connection = aio_pika.RobustConnection(make_url(NODES[1]))
    connection.close_callbacks.add(_Failover(NODES, 1))
    ports = []
    for _ in range(4):
        # What aio-pika does on a lost connection and on each failed reconnect attempt.
        await connection.close_callbacks(ConnectionError("connection reset"))
        ports.append(connection.url.port)
    assert ports == [5674, 5672, 5673, 5674]
    assert str(connection.url) == NODES[2]  # credentials and vhost kept


async def test_one_failure_told_twice_moves_on_once() -> None:
    # A reconnect whose channels fail to restore runs the callbacks with the error, then closes
    # the transport with the same error, which runs them again: with two nodes, moving twice
    # would land on the failing node every time.
    connection = aio_pika.RobustConnection(make_url(NODES[0]))
    connection.close_callbacks.add(_Failover(NODES[:2], 0))
    failure = ConnectionError("channel restore failed")
    await connection.close_callbacks(failure)
    await connection.close_callbacks(failure)
    assert connection.url.port == 5673
    await connection.close_callbacks(ConnectionError("the next failure"))
    assert connection.url.port == 5672


async def test_a_deliberate_close_does_not_move_the_connection() -> None:
    connection = aio_pika.RobustConnection(make_url(NODES[0]))
    connection.close_callbacks.add(_Failover(NODES, 0))
    await connection.close()  # never connected: the callbacks still run, and must not switch
    await connection.close_callbacks(None)
    assert connection.url.port == 5672


@pytest.mark.parametrize(
    ("url", "endpoint", "shown"),
    [
        (
            "amqp://geo:secret@rabbit-a:5673/bangui",
            "rabbit-a:5673/bangui",
            "amqp://geo:***@rabbit-a:5673/bangui",
        ),
        (
            "amqps://geo:secret@[2001:db8::7]/bangui",
            "[2001:db8::7]:5671/bangui",
            "amqps://geo:***@[2001:db8::7]/bangui",
        ),
        ("amqp://[::1]:5672/", "[::1]:5672/", "amqp://[::1]:5672/"),
    ],
)
def test_logs_name_a_broker_without_its_password_and_ipv6_in_brackets(
    url: str, endpoint: str, shown: str
) -> None:
    assert _endpoint(url) == endpoint
    assert redacted(url) == shown
    assert "secret" not in redacted(url)


async def test_aio_pika_still_connects_to_the_url_retarget_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``retarget`` writes aio-pika's ``url`` attribute (no public API moves a robust
    connection): this fails if a new aio-pika stops reconnecting to it."""
    dialed: list[object] = []

    async def dial(url: object, *_: object, **__: object) -> None:
        dialed.append(url)
        raise ConnectionError("not dialed for real")

    monkeypatch.setattr(aio_pika.abc.UnderlayConnection, "connect", dial)
    connection = aio_pika.RobustConnection(make_url(NODES[0]))
    retarget(connection, NODES[2])
    with pytest.raises(ConnectionError):
        await aio_pika.Connection.connect(connection)  # what each reconnect attempt runs
    assert dialed == [make_url(NODES[2])]
    assert "Connection.connect(self" in inspect.getsource(aio_pika.RobustConnection)
