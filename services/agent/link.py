"""The agent's way to the broker: publish a batch and return only once it is confirmed,
reconnecting with back-off for as long as it takes (or until the agent is told to stop).

A failed connection is dropped and opened again rather than left to recover in the background,
so every attempt starts clean and the health check tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from services.agent.backoff import retry_delay
from shared import topology
from shared.amqp import ExchangePublisher

CLOSE_TIMEOUT = 5.0

Logger = structlog.typing.FilteringBoundLogger


@dataclass(frozen=True)
class LinkSettings:
    url: str
    connect_timeout: float
    confirm_timeout: float
    retry_base: float
    retry_max: float


class BrokerLink:
    def __init__(self, settings: LinkSettings, stop: asyncio.Event, log: Logger) -> None:
        self._settings = settings
        self._stop = stop
        self._log = log
        self._publisher: ExchangePublisher | None = None
        self._down_since: float | None = None
        self.failures = 0

    @property
    def connected(self) -> bool:
        return self._publisher is not None and not self._publisher.connection.is_closed

    async def publish(self, bodies: Sequence[bytes]) -> bool:
        """True once the broker confirmed every body; False if stopped first (nothing is
        known then about the unconfirmed ones: they are sent again after a restart)."""
        attempt = 0
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            try:
                if self._publisher is None:
                    self._publisher = await ExchangePublisher.open(
                        self._settings.url,
                        connect_timeout=self._settings.connect_timeout,
                        confirm_timeout=self._settings.confirm_timeout,
                    )
                await self._publisher.publish(topology.IP_SEEN, bodies)
            except Exception as exc:  # any failure means: drop the connection, retry later
                self.failures += 1
                await self._drop()
                if self._down_since is None:
                    self._down_since = loop.time()
                delay = retry_delay(
                    attempt,
                    base=self._settings.retry_base,
                    cap=self._settings.retry_max,
                    jitter=random.random(),
                )
                attempt += 1
                self._log.warning(
                    "agent_publish_failed",
                    error=str(exc) or repr(exc),
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                continue
            if self._down_since is not None:
                self._log.info(
                    "agent_broker_restored", down_s=round(loop.time() - self._down_since, 1)
                )
                self._down_since = None
            return True
        return False

    async def _drop(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), timeout=CLOSE_TIMEOUT)

    async def close(self) -> None:
        await self._drop()
