"""The geo services run as a test or the benchmark needs them: each by its contract start
command (``python -m services.<name>``) with the ``GEO_*`` settings it is given, its JSON log
kept in a file, and a ``ServiceGroup`` that starts, restarts, kills and stops them, reads the
``geo_cache`` they write, and kills whatever still runs at teardown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import bangui_geo
from bangui_geo.testing import postgres
from bangui_geo.testing.amqp import wait_for_topology
from bangui_geo.testing.polling import async_poll

REPO_ROOT = Path(bangui_geo.__file__).resolve().parents[1]
# Stopped in this order: the timer first, then the resolver (its final flush still reaches
# persistence), then persistence; any other name after them.
STOP_ORDER = ("timer", "resolver", "persistence")
POLL_S = 0.02


class ServiceFailed(RuntimeError):
    """A service exited, or did not log what was awaited, in time."""


def service_env(amqp_url: str, db_path: Path, **overrides: str) -> dict[str, str]:
    """This process's environment without its ``GEO_*`` settings, plus the broker, the SQLite
    file, a fast flush, JSON logs and ``overrides``."""
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


def event_time(event: dict[str, Any]) -> float:
    """A structlog event's ISO-8601 UTC timestamp as epoch seconds."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@dataclass
class ServiceProcess:
    """One service started as ``python -m services.<name>``, its output kept in a log file.
    Built by ``ServiceGroup.start`` only."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

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

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

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
        self._close_log()
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._close_log()

    def wait(self, timeout: float) -> int:
        """The exit code of a service expected to exit by itself."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()

    def log_events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def events(process: ServiceProcess, name: str) -> list[dict[str, Any]]:
    """The log events called ``name`` a service has written so far."""
    return [e for e in process.log_events() if e.get("event") == name]


def read_rows(db_path: Path) -> dict[str, tuple[Any, ...]]:
    """ip -> (country_code, country_name, asn, org, cached_at, resolution, provider) of a SQLite
    ``geo_cache``; {} before the file or the table exists."""
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


@dataclass
class ServiceGroup:
    """The services of one test or scenario: one broker vhost (``amqp_url``), one ``geo_cache``
    (the SQLite file ``db_path``, or PostgreSQL when ``env`` sets ``GEO_DB_URL``), logs in
    ``log_dir``. ``env`` applies to every service started; ``start`` adds its own."""

    amqp_url: str
    db_path: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    started: list[ServiceProcess] = field(default_factory=list)
    _runs: Counter[str] = field(default_factory=Counter, repr=False)

    def env_for(self, amqp_url: str | None = None, **env: str) -> dict[str, str]:
        """The environment a service of this group starts with (also the CLI's)."""
        return service_env(amqp_url or self.amqp_url, self.db_path, **{**self.env, **env})

    def start(
        self, service: str, name: str | None = None, *, amqp_url: str | None = None, **env: str
    ) -> ServiceProcess:
        """Start ``service`` (resolver, timer, persistence) as ``name`` (default: the service;
        give another to run several of a kind); its log is ``log_dir/<name>.log``."""
        return self._launch(service, name or service, self.env_for(amqp_url, **env))

    def _launch(self, service: str, name: str, env: dict[str, str]) -> ServiceProcess:
        runs = self._runs[name]
        self._runs[name] += 1
        log = self.log_dir / (f"{name}.log" if runs == 0 else f"{name}.{runs}.log")
        process = ServiceProcess(service, env, log).start()
        self.processes[name] = process
        self.started.append(process)
        return process

    async def start_pipeline(self, **env: str) -> list[ServiceProcess]:
        """Start the resolver, the timer and persistence, and wait for their topology and for
        the resolver and persistence to consume (a loaded machine can take seconds)."""
        started = [self.start(name, **env) for name in ("resolver", "timer", "persistence")]
        await wait_for_topology(self.amqp_url)
        for name, ready in (("resolver", "resolver_ready"), ("persistence", "persistence_ready")):
            await asyncio.to_thread(self.wait_event, name, ready)
        return started

    def restart(self, name: str) -> ServiceProcess:
        """SIGKILL ``name`` (if it still runs) and start it again with the same settings."""
        old = self.processes[name]
        if old.running:
            old.kill()
        return self._launch(old.name, name, old.env)

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def stop(self, name: str, timeout: float = 10.0) -> int:
        """SIGTERM ``name`` and its exit code (it must stop within ``timeout``)."""
        return self.processes[name].stop(timeout)

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every service, in ``STOP_ORDER`` of their kinds; their exit codes by name."""
        rank = {service: i for i, service in enumerate(STOP_ORDER)}
        names = sorted(self.processes, key=lambda n: rank.get(self.processes[n].name, len(rank)))
        return {name: self.processes[name].stop() for name in names}

    def kill_all(self) -> None:
        """Teardown: SIGKILL whatever this group started and still runs."""
        for process in self.started:
            if process.running:
                process.kill()

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.processes[name]

    def all_running(self) -> bool:
        return all(p.running for p in self.processes.values())

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def rows(self) -> dict[str, tuple[Any, ...]]:
        """ip -> (country_code, country_name, asn, org, cached_at, resolution, provider)."""
        if pg_url := self.env.get("GEO_DB_URL"):
            return postgres.read_rows(pg_url)
        return read_rows(self.db_path)

    def row_count(self) -> int:
        """Rows in ``geo_cache`` now (0 before the table exists)."""
        if "GEO_DB_URL" in self.env or not self.db_path.exists():
            return len(self.rows())
        with closing(sqlite3.connect(self.db_path, timeout=5)) as db:
            try:
                return int(db.execute("SELECT COUNT(*) FROM geo_cache").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        """``name``'s JSON log events so far (only those called ``event``, if given)."""
        found = self.processes[name].log_events()
        return found if event is None else [e for e in found if e.get("event") == event]

    def wait_event(self, name: str, event: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The first ``event`` in ``name``'s log; fails loudly if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name, event)
            if found:
                return found[0]
            if not self.processes[name].running:
                raise ServiceFailed(f"{name} exited before {event}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise ServiceFailed(f"no {event} from {name} in {timeout}s:\n{self.log_tail(name)}")
            time.sleep(POLL_S)

    def log_tail(self, name: str, lines: int = 15) -> str:
        return self.processes[name].log_tail(lines)

    def check_running(self) -> None:
        """Raise ``ServiceFailed`` with its last log lines if a service has exited."""
        for name, process in self.processes.items():
            if not process.running:
                raise ServiceFailed(f"{name} exited during the measurement:\n{self.log_tail(name)}")

    def cli(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``bangui-geo ARGS`` (``python -m services.cli``) with this group's settings."""
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env_for(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


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


async def logged(process: ServiceProcess, event: str, what: str, deadline_s: float = 15) -> None:
    """Wait until ``process`` has logged ``event`` (``what`` names it in the failure)."""
    await async_poll(lambda: events(process, event), deadline_s=deadline_s, what=what)
