"""What the figures were measured on: date, CPU, cores, memory, kernel, Python, SQLite and
RabbitMQ versions. Figures without this are not comparable across runs or machines."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from time import monotonic as time_monotonic


def _cpuinfo_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def docker_iptables_chains() -> list[str]:
    """Docker's iptables chains (DOCKER, DOCKER-USER, DOCKER-ISOLATION-*), in the filter or nat
    table. Left behind after an engine has run, they slowed the bulk drain over loopback from
    100,000 to 64,000-68,000 IPs/s here. Empty when iptables is absent or unreadable."""
    save = shutil.which("iptables-save")
    if save is None:
        return []
    try:
        out = subprocess.run([save], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(
        {line[1:].split()[0] for line in out.stdout.splitlines() if line.startswith(":DOCKER")}
    )


def describe(rabbitmq: str) -> dict[str, str]:
    facts = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": _cpuinfo_model(),
        "cores": f"{_usable_cores()} usable of {os.cpu_count()}",
        "ram": f"{_mem_total_gib():.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "aio-pika": metadata.version("aio-pika"),
        "rabbitmq": rabbitmq,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min, at start)",
    }
    if chains := docker_iptables_chains():
        facts["WARNING"] = (
            f"Docker's iptables rules are present ({', '.join(chains)}): loopback figures run "
            "about a third slower; stop the engine and remove them first"
        )
    return facts


def _busy_cpu_s() -> float:
    """CPU seconds all processors spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _broker_cpu_s() -> float:
    """CPU seconds of a local RabbitMQ (``beam.smp``), 0 when it is not visible here."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name.startswith("beam"):
            after = text[text.rfind(")") + 2 :].split()
            total += (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _own_cpu_s() -> float:
    """This process and its reaped children (the services, the probes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class CpuWatch:
    """How much CPU other processes took during a scenario: the machine's busy time minus ours
    and the broker's. On a shared machine, a large figure means that scenario's numbers are
    noisy and worth re-running."""

    def __init__(self) -> None:
        self._start = (time_monotonic(), _busy_cpu_s(), _own_cpu_s(), _broker_cpu_s())

    def report(self) -> tuple[float, float]:
        """(CPU seconds used by others, CPU seconds the machine had) since construction."""
        wall0, busy0, own0, broker0 = self._start
        wall = time_monotonic() - wall0
        others = (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0) - (_broker_cpu_s() - broker0)
        return max(0.0, others), wall * _usable_cores()
