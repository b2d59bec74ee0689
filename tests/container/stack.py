"""Drives the real docker-compose.yml for the container lane: one compose project per stack,
host ports picked free (the host's own broker keeps 5672), the services' settings from a lane
env file (a 1 s flush instead of 60 s). Every command failure raises with compose's output and
the last log lines of the containers that are not healthy."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bangui_geo.testing import public_ips as generated_public_ips

REPO = Path(__file__).resolve().parents[2]
PUBLISHER_PASSWORD = "dev-only-bangui-publisher"
ADMIN_PASSWORD = "dev-only-bangui-admin"


class StackFailed(AssertionError):
    pass


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def public_ips(count: int, seed: int) -> list[str]:
    """Distinct global unicast IPv4 addresses (the embedded provider resolves most of them), in
    order: ``bangui_geo.testing.public_ips``, the one generator."""
    return sorted(generated_public_ips(count, seed))


@dataclass
class Stack:
    """One compose project of docker-compose.yml, as the README's commands run it."""

    project: str
    env_file: Path
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        amqp, mgmt, *cluster = free_ports(8)
        self.env.update(
            RABBITMQ_AMQP_PORT=str(amqp),
            RABBITMQ_MANAGEMENT_PORT=str(mgmt),
            BANGUI_GEO_ENV_FILE=str(self.env_file),
        )
        for node, (a, m) in zip("ABC", zip(cluster[::2], cluster[1::2], strict=True), strict=True):
            self.env[f"RABBITMQ_{node}_AMQP_PORT"] = str(a)
            self.env[f"RABBITMQ_{node}_MANAGEMENT_PORT"] = str(m)

    def port(self, name: str) -> int:
        return int(self.env[name])

    def compose(
        self, *args: str, stdin: str | None = None, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = ["docker", "compose", "-p", self.project, *self.extra_args, *args]
        result = subprocess.run(
            command,
            cwd=REPO,
            env={**os.environ, **self.env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise StackFailed(
                f"`docker compose {' '.join(args[:3])}` failed (exit {result.returncode}): "
                f"{last_line(result.stderr)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                f"\n{self.unhealthy_logs()}"
            )
        return result

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise StackFailed(f"expected one {service} container, found {len(ids)}")
        return ids[0]

    def state(self, service: str) -> dict[str, object]:
        raw = docker("inspect", "-f", "{{json .State}}", self.container(service))
        state = json.loads(raw)
        assert isinstance(state, dict)
        return state

    def restart_count(self, service: str) -> int:
        return int(docker("inspect", "-f", "{{.RestartCount}}", self.container(service)))

    def crash(self, service: str) -> None:
        """SIGKILL the container's process from the host, as a crash or the OOM killer would.

        `docker kill` counts as a deliberate stop: the engine then leaves the container stopped
        whatever the restart policy says (seen on 20.10). A process killed from outside is
        what `restart: unless-stopped` is for."""
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", self.container(service)))
        assert pid > 0, f"{service} is not running"
        os.kill(pid, 9)

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        def healthy() -> bool:
            state = self.state(service)
            health = state.get("Health")
            return bool(state.get("Running")) and (
                not isinstance(health, dict) or health.get("Status") == "healthy"
            )

        wait_for(healthy, timeout, f"{service} healthy again", on_timeout=self.unhealthy_logs)

    def unhealthy_logs(self) -> str:
        lines: list[str] = []
        try:
            ids = subprocess.run(
                ["docker", "compose", "-p", self.project, *self.extra_args, "ps", "-aq"],
                cwd=REPO,
                env={**os.environ, **self.env},
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            ).stdout.split()
            for cid in ids:
                health = "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
                info = docker("inspect", "-f", "{{.Name}} {{.State.Status}} " + health, cid)
                if info.endswith(" running healthy") or info.endswith(" running"):
                    continue
                logs = subprocess.run(
                    ["docker", "logs", "--tail", "30", cid],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=30,
                )
                lines.append(f"--- {info}; last log lines:\n{logs.stdout}{logs.stderr}")
        except (subprocess.SubprocessError, OSError) as exc:
            lines.append(f"(could not read the containers' logs: {exc})")
        return "\n".join(lines)

    def publish(self, ips: Iterable[str], urls: Sequence[str]) -> None:
        """`bangui-geo publish` in a container of the image on the compose network, as the
        publisher user (the timer service's container definition: no volume, no port)."""
        self.compose(
            "run",
            "--rm",
            "--no-deps",
            "-T",
            "-e",
            "GEO_AMQP_URL=" + ",".join(urls),
            "timer",
            "bangui-geo",
            "publish",
            "--quiet",
            "-",
            stdin="\n".join(ips) + "\n",
            timeout=120,
        )

    def rows(self, fresh: bool = True) -> int:
        """The rows of geo_cache in the persistence volume, read by `bangui-geo stats` in a new
        container of the persistence service (``fresh``), or in the running one (faster, for
        polling)."""
        where = ("run", "--rm", "--no-deps") if fresh else ("exec",)
        result = self.compose(*where, "-T", "persistence", "bangui-geo", "stats", check=False)
        if result.returncode != 0 and "does not exist" in result.stderr:
            return 0  # persistence creates the file with its first batch
        if result.returncode != 0:
            raise StackFailed(f"bangui-geo stats failed: {last_line(result.stderr)}")
        match = re.search(r"^\s*total\s+([\d,]+)", result.stdout, re.MULTILINE)
        if match is None:
            raise StackFailed(f"bangui-geo stats printed no total:\n{result.stdout}")
        return int(match.group(1).replace(",", ""))  # stats prints 5,000

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: docker(kind, "ls", "-q", "--filter", label).split()
            for kind in ("container", "volume", "network")
        } | {"container": docker("ps", "-aq", "--filter", label).split()}


def docker(*args: str) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise StackFailed(f"`docker {' '.join(args[:2])}` failed: {last_line(result.stderr)}")
    return result.stdout.strip()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    on_timeout: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    detail = on_timeout() if on_timeout else ""
    raise StackFailed(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")
