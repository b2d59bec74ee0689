"""The real services under test, started by their contract commands, and what the benchmark reads
back from them: structlog JSON events (with their timestamps), ``geo_cache`` row counts, RSS.

Timing comes from the services' own log timestamps where the moment matters (``resolver_ready``,
each ``geo_upserts_applied`` commit), so polling intervals do not blur the figures.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from bangui_geo.testing import ServiceProcess, service_env

POLL_S = 0.02
ROWS_POLL_S = 0.05  # only decides when to stop: the figures use the services' log timestamps
# No re-resolve during a measurement: its reads and retries are not what is measured.
QUIET_RE_RESOLVE_S = "3600"


def event_time(event: dict[str, Any]) -> float:
    """The event's structlog ISO-8601 UTC timestamp as epoch seconds."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in bytes (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class ServiceFailed(RuntimeError):
    pass


def py_spy() -> str | None:
    """The py-spy executable: beside this Python (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    """py-spy attached to one service: samples every thread until the service exits, then writes
    a flame graph. It pauses nothing (``--nonblocking``), but it takes CPU from the services, so
    figures measured under it are not comparable with plain runs."""

    output: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    @classmethod
    def attach(cls, executable: str, pid: int, output: Path) -> Profiler:
        log = output.with_suffix(".py-spy.log").open("wb")  # why, if no graph (e.g. no ptrace)
        command = [executable, "record", "--pid", str(pid), "--output", str(output)]
        command += ["--rate", "200", "--threads", "--nonblocking"]
        return cls(output, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)

    def wait(self, timeout: float = 30.0) -> Path | None:
        """The flame graph once py-spy has written it (it exits with its target), else None."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            self.log.close()
        return self.output if self.output.exists() else None


@dataclass
class Services:
    """The services of one scenario: one vhost, one SQLite file, logs in ``log_dir``."""

    amqp_url: str
    db_path: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    profile: bool = False  # attach py-spy to each service started (flame graphs in log_dir)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    profilers: dict[str, Profiler] = field(default_factory=dict)

    def start(self, name: str, **env: str) -> ServiceProcess:
        overrides = {"GEO_RE_RESOLVE_INTERVAL": QUIET_RE_RESOLVE_S, **self.env, **env}
        process = ServiceProcess(
            name,
            service_env(self.amqp_url, self.db_path, **overrides),
            self.log_dir / f"{name}.log",
        ).start()
        self.processes[name] = process
        if self.profile:
            executable = py_spy()
            if executable is None:
                raise ServiceFailed("--profile needs py-spy: pip install py-spy")
            assert process.process is not None
            output = self.log_dir / f"{name}.profile.svg"
            self.profilers[name] = Profiler.attach(executable, process.process.pid, output)
        return process

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
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
        path = self.processes[name].log_path
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if not process.running:
                raise ServiceFailed(f"{name} exited during the measurement:\n{self.log_tail(name)}")

    def pid(self, name: str) -> int:
        process = self.processes[name].process
        assert process is not None
        return process.pid

    def stop_all(self) -> dict[str, int]:
        """SIGTERM in pipeline order (resolver flushes to persistence first); exit codes."""
        codes: dict[str, int] = {}
        for name in ("timer", "resolver", "persistence"):
            process = self.processes.get(name)
            if process is not None and process.process is not None:
                codes[name] = process.stop()
        return codes

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.running:
                process.kill()

    def flame_graphs(self) -> dict[str, Path | None]:
        """After the services stopped: each profiled service's flame graph (None if missing)."""
        return {name: profiler.wait() for name, profiler in self.profilers.items()}


def row_count(db_path: Path) -> int:
    """Rows in a ``geo_cache`` that has only had inserts: ``max(rowid)``, a B-tree descent, where
    ``count(*)`` would scan the table and take CPU from the services being measured."""
    if not db_path.exists():
        return 0
    try:
        with closing(sqlite3.connect(db_path, timeout=5)) as db:
            return int(db.execute("SELECT max(rowid) FROM geo_cache").fetchone()[0] or 0)
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def wait_rows(services: Services, expected: int, *, timeout: float) -> float:
    """Poll ``geo_cache`` until it holds ``expected`` rows; returns when that was seen (epoch)."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = row_count(services.db_path)
        if count >= expected:
            return time.time()
        services.check_running()
        time.sleep(ROWS_POLL_S)
    raise ServiceFailed(f"geo_cache holds {count} of {expected} rows after {timeout}s")
