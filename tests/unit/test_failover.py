"""Failing over between the nodes listed in ``GEO_AMQP_URL``, without a broker: each loss of
the connection (or failed reconnect attempt) points aio-pika's robust connection at the next
node, round robin; a deliberate close points it nowhere new."""

from __future__ import annotations

import aio_pika
from aio_pika.connection import make_url

from shared.amqp.connection import _Failover

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


async def test_a_deliberate_close_does_not_move_the_connection() -> None:
    connection = aio_pika.RobustConnection(make_url(NODES[0]))
    connection.close_callbacks.add(_Failover(NODES, 0))
    await connection.close()  # never connected: the callbacks still run, and must not switch
    await connection.close_callbacks(None)
    assert connection.url.port == 5672
