"""The timer's leader lock: an exclusive queue, attempted every second on one plain aiormq
channel that is kept while it stays open, so a check leaves nothing behind.

Each aio-pika channel that opens adds an observer to its connection's closing future
(``UnderlayChannel.create`` via aiormq's ``closing`` property, which returns a new observer on
every read) and never removes it: closing the channel removes its callback from yet another new
observer. A channel per check leaked ~4 kB a second in the timer, leader and standby alike. A
plain aiormq channel registers nothing on the connection that outlives it. The leader's checks
succeed and reuse the kept channel; a standby's fail with 405 RESOURCE_LOCKED, which closes the
channel on the broker's side, so the next check opens a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiormq.abc
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError, ChannelLockedResource


@dataclass
class LeaderLock:
    """Attempts on ``lock_name`` over ``connection``; one channel reused while it is open."""

    _channel: aiormq.abc.AbstractChannel | None = None

    async def attempt(self, connection: AbstractRobustConnection, lock_name: str) -> bool:
        """True when this connection holds the lock now (declared it, or already did); False
        while another connection holds it. Raises when the broker cannot be asked."""
        channel = await self._open(connection)
        try:
            await channel.queue_declare(lock_name, exclusive=True, durable=False)
        except ChannelLockedResource:  # the broker closed the channel with this answer
            self._channel = None
            return False
        return True

    async def _open(self, connection: AbstractRobustConnection) -> aiormq.abc.AbstractChannel:
        transport = connection.transport
        if transport is None:
            raise AMQPConnectionError("not connected (reconnecting)")
        channel = self._channel
        if channel is None or channel.is_closed or channel.connection is not transport.connection:
            # The first check, or the broker or a reconnect closed the last channel.
            channel = await transport.connection.channel(publisher_confirms=False)
            self._channel = channel
        return channel

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()
