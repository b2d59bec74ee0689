"""The real services under test, a ``ServiceGroup`` per scenario (started by their contract
commands), and what the benchmark reads back from them: structlog JSON events (with their
timestamps), ``geo_cache`` row counts, RSS, and py-spy flame graphs.

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
from pathlib import Path
from typing import IO

from bangui_geo.testing import ServiceFailed, ServiceGroup, ServiceProcess

ROWS_POLL_S = 0.05  # only decides when to stop: the figures use the services' log timestamps
# No re-resolve during a measurement: its reads and retries are not what is measured.
QUIET_RE_RESOLVE_S = "3600"


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
class Services(ServiceGroup):
    """The services of one scenario (``ServiceGroup``), with no re-resolve during the measurement
    unless a scenario sets its own, and with ``profile`` py-spy attached to each service started
    (flame graphs in ``log_dir``)."""

    profile: bool = False
    profilers: dict[str, Profiler] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {"GEO_RE_RESOLVE_INTERVAL": QUIET_RE_RESOLVE_S, **self.env}

    def start(
        self, service: str, name: str | None = None, *, amqp_url: str | None = None, **env: str
    ) -> ServiceProcess:
        process = super().start(service, name, amqp_url=amqp_url, **env)
        if self.profile:
            executable = py_spy()
            if executable is None:
                raise ServiceFailed("--profile needs py-spy: pip install py-spy")
            output = self.log_dir / f"{name or service}.profile.svg"
            self.profilers[name or service] = Profiler.attach(executable, process.pid, output)
        return process

    def start_resolver_last(self) -> None:
        """Start persistence and the timer and wait until persistence is ready and the timer
        leads; then the resolver, so that it meets a full queue with the rest of the pipeline
        already waiting."""
        self.start("persistence")
        self.start("timer")
        self.wait_event("persistence", "persistence_ready")
        self.wait_event("timer", "timer_leading")
        self.start("resolver")

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
