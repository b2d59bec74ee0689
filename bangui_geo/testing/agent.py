"""The fail2ban agent run by its start command (``bangui-geo agent``, as ``python -m
services.cli agent``): kept running like a service, or run once to its exit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bangui_geo.testing.services import REPO_ROOT, ServiceProcess


class AgentProcess(ServiceProcess):
    """``bangui-geo agent`` with the given flags; stopped, killed and read like a service."""

    def __init__(self, env: dict[str, str], log_path: Path, flags: Sequence[str]) -> None:
        super().__init__("agent", env, log_path)
        self.flags = list(flags)

    def start(self) -> AgentProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "agent", *self.flags],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self


def run_agent_once(
    env: dict[str, str], flags: Sequence[str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """The agent run to its exit (for the start checks that end it at once)."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "agent", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
