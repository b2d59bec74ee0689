"""The agent's way to the broker: publish a batch and return only once it is confirmed,
reconnecting with back-off for as long as it takes (or until the agent is told to stop).

A failed connection is dropped and opened again rather than left to recover in the background,
so every attempt starts clean. While there is nothing to publish, ``keep_connected`` holds the
connection open (and reopens it), so ``/health`` says whether the next ban could go out.
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
IDLE_CHECK_S = 1.0

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
        self._lock = asyncio.Lock()  # one opener at a time: a publish or the idle keeper
        self._attempt = 0  # failed attempts in a row
        self._down_since: float | None = None
        self._publishing = False
        self.failures = 0

    @property
    def connected(self) -> bool:
        publisher = self._publisher
        if publisher is None:
            return False
        connection = publisher.connection
        return not connection.is_closed and connection.connected.is_set()

    async def publish(self, bodies: Sequence[bytes]) -> bool:
        """True once the broker confirmed every body; False if stopped first (nothing is
        known then about the unconfirmed ones: they are sent again after a restart)."""
        self._publishing = True
        try:
            while not self._stop.is_set():
                publisher = await self._open()
                if publisher is None:
                    await self._back_off()
                    continue
                try:
                    await publisher.publish(topology.IP_SEEN, bodies)
                except Exception as exc:  # any failure means: drop the connection, retry later
                    await self._failed("agent_publish_failed", exc)
                    await self._back_off()
                    continue
                return True
            return False
        finally:
            self._publishing = False

    async def keep_connected(self) -> None:
        """While no publish runs: open the connection, and reopen it once it is lost."""
        while not self._stop.is_set():
            if not self._publishing and not self.connected:
                if self._publisher is not None:
                    await self._failed("agent_connection_lost", None)
                if await self._open() is None:
                    await self._back_off()
                    continue
            await self._wait(IDLE_CHECK_S)

    async def _open(self) -> ExchangePublisher | None:
        async with self._lock:
            if self._publisher is not None:
                return self._publisher
            try:
                self._publisher = await ExchangePublisher.open(
                    self._settings.url,
                    connect_timeout=self._settings.connect_timeout,
                    confirm_timeout=self._settings.confirm_timeout,
                )
            except Exception as exc:
                await self._failed("agent_connect_failed", exc)
                return None
            loop = asyncio.get_running_loop()
            if self._down_since is not None:
                self._log.info(
                    "agent_broker_restored", down_s=round(loop.time() - self._down_since, 1)
                )
            else:
                self._log.info("agent_broker_connected")
            self._down_since = None
            self._attempt = 0
            return self._publisher

    async def _failed(self, event: str, exc: BaseException | None) -> None:
        """Count and log a failed attempt (``event`` says which kind), drop the connection."""
        self.failures += 1
        self._attempt += 1
        await self._drop()
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()
        error = "" if exc is None else str(exc) or repr(exc)
        self._log.warning(event, error=error, attempt=self._attempt)

    async def _back_off(self) -> None:
        delay = retry_delay(
            self._attempt - 1,
            base=self._settings.retry_base,
            cap=self._settings.retry_max,
            jitter=random.random(),
        )
        self._log.debug("agent_retry_scheduled", retry_in_s=round(delay, 2))
        await self._wait(delay)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _drop(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), timeout=CLOSE_TIMEOUT)

    async def close(self) -> None:
        await self._drop()
