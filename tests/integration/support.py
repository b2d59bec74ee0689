"""Helpers for integration tests: run the services by their contract start commands, publish
to and read from the real broker, read the real SQLite file, and poll with a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import aio_pika

from tests.broker import BrokerAdmin, management_json

REPO_ROOT = Path(__file__).resolve().parents[2]
# The contract's durable queues, spelled out (not taken from shared.topology) so that a renamed
# queue fails the tests that check how the broker holds them.
DURABLE_QUEUES = (
    "geo.resolver.ip_seen",
    "geo.resolver.retry",
    "geo.persistence.upsert",
    "geo.persistence.re_resolve",
    "geo.dead_letter",
)
T = TypeVar("T")


def service_env(amqp_url: str, db_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    env.update(
        GEO_AMQP_URL=amqp_url,
        GEO_DB_PATH=str(db_path),
        GEO_FLUSH_INTERVAL="0.5",
        GEO_RE_RESOLVE_INTERVAL="60",
        GEO_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


@dataclass
class ServiceProcess:
    """One service started as ``python -m services.<name>``, its output kept in a log file."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; the contract says a service stops gracefully within 10 s."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout}s") from None
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._log.close()

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


async def publish(
    amqp_url: str,
    routing_key: str,
    bodies: Iterable[bytes | Mapping[str, Any] | list[Any] | str],
    *,
    exchange: str = "bangui",
) -> int:
    """Publish raw bodies (dicts are JSON-encoded) with confirms; returns how many."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        encoded = [
            b
            if isinstance(b, bytes)
            else (b.encode() if isinstance(b, str) else json.dumps(b).encode())
            for b in bodies
        ]
        for start in range(0, len(encoded), 500):
            await asyncio.gather(
                *(
                    target.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key,
                    )
                    for body in encoded[start : start + 500]
                )
            )
        return len(encoded)
    finally:
        await connection.close()


async def drain_queue(amqp_url: str, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message currently in ``queue_name`` (acked)."""
    connection = await aio_pika.connect(amqp_url)
    out = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            out.append(message)
    finally:
        await connection.close()
    return out


async def wait_for_topology(amqp_url: str, deadline_s: float = 20.0) -> None:
    """Wait until a service has declared the topology (the exchange exists)."""

    async def declared() -> bool:
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            await channel.get_exchange("bangui", ensure=True)
            await channel.get_queue("geo.persistence.upsert", ensure=True)
            return True
        except Exception:
            return False
        finally:
            await connection.close()

    await async_poll(declared, deadline_s=deadline_s, what="topology declared")


def read_rows(db_path: Path) -> dict[str, tuple[Any, ...]]:
    """ip -> (country_code, country_name, asn, org, cached_at, resolution, provider)."""
    if not db_path.exists():
        return {}
    with sqlite3.connect(db_path, timeout=5) as db:
        try:
            cursor = db.execute(
                "SELECT ip, country_code, country_name, asn, org, cached_at, resolution, provider"
                " FROM geo_cache"
            )
        except sqlite3.OperationalError:
            return {}
        return {row[0]: tuple(row[1:]) for row in cursor}


def poll(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def async_poll(
    check: Callable[[], Any], *, deadline_s: float, what: str, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {deadline_s}s waiting for {what}; last: {last!r}")


async def ready_count(amqp_url: str, queue_name: str) -> int:
    """Messages ready in ``queue_name`` (delivered-but-unacked ones are not counted)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (its path, percent-decoded; ``/`` when there is none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def queue_details(admin: BrokerAdmin, amqp_url: str, queue: str) -> dict[str, Any]:
    """The management API's view of one queue of ``amqp_url``'s vhost: ``consumers``,
    ``consumer_details``, ``single_active_consumer_tag``, ``type``, ``arguments``, …"""
    path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}/{quote(queue, safe='')}"
    details = await asyncio.to_thread(management_json, admin, path)
    assert isinstance(details, dict), details
    return details


async def vhost_queues(admin: BrokerAdmin, amqp_url: str) -> list[dict[str, Any]]:
    """Every queue of ``amqp_url``'s vhost, as the management API lists them."""
    path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}"
    queues = await asyncio.to_thread(management_json, admin, path)
    assert isinstance(queues, list), queues
    return queues


def events(process: ServiceProcess, name: str) -> list[dict[str, Any]]:
    """The log events called ``name`` a service has written so far."""
    return [e for e in process.log_events() if e.get("event") == name]


def local_tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (Linux /proc): which process is
    behind a connection the broker reports by its ``peer_port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
