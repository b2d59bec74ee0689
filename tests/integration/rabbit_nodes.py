"""Extra RabbitMQ nodes of the installed broker, private to one test: their own node name, ports,
data, logs, config and Erlang cookie under a temporary HOME.

The system broker on 5672 is never touched: its cookie differs from the test nodes' cookie, so
``rabbitmqctl`` calls made through ``Node.ctl`` cannot reach it even by mistake, and ``Node.stop``
kills only the processes of its own node name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

# Debian/Ubuntu put the real scripts here; the /usr/sbin ones re-run them as the rabbitmq user
# (and its cookie), which these private nodes must not share.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_tool(name: str) -> str:
    direct = RABBITMQ_BIN / name
    if direct.exists():
        return str(direct)
    found = shutil.which(name)
    assert found, (
        f"this test starts RabbitMQ nodes of its own and needs {name} on this machine "
        "(the rabbitmq-server package)"
    )
    return found


def prepare_home(home: Path, cookie: str) -> None:
    """The files every node under ``home`` shares: its Erlang cookie (also the CLI's), no
    plugins, and an empty env file instead of /etc/rabbitmq's."""
    cookie_file = home / ".erlang.cookie"
    cookie_file.write_text(cookie)
    cookie_file.chmod(0o400)
    (home / "enabled_plugins").write_text("[].\n")
    (home / "rabbitmq-env.conf").write_text("")


@dataclass
class Node:
    """One node ``<name>@localhost``; AMQP on ``port`` (127.0.0.1), distribution on port+20000.

    ``config`` replaces the default ``rabbitmq.conf`` (a plain listener on ``port``).
    """

    name: str
    port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None
    config: str | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def endpoint(self) -> str:
        """How the services' logs name this node (``shared.amqp.connection._endpoint``)."""
        return f"127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        base = self.home
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(base),  # the Erlang cookie of these nodes and of the CLI talking to them
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.port + 20_000),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / f"{self.name}.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),  # none: no management
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            RABBITMQ_PID_FILE=str(base / f"{self.name}.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def ctl(self, *args: str, timeout: float = 60) -> str:
        command = [rabbitmq_tool("rabbitmqctl"), "-n", self.nodename, *args]
        result = subprocess.run(
            command, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, f"{' '.join(command[1:])}: {result.stderr or result.stdout}"
        return result.stdout

    def assert_not_running(self) -> None:
        in_use = [n for _, n in processes() if f"{self.nodename} " in n + " "]
        assert not in_use, f"{self.nodename} already runs (a previous run left it?)"

    def start(self) -> None:
        config = self.config
        if config is None:
            config = f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
        (self.home / f"{self.name}.conf").write_text(config)
        log = (self.home / f"{self.name}.out").open("ab")
        self.process = subprocess.Popen(
            [rabbitmq_tool("rabbitmq-server")],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one if it hangs
        )
        log.close()

    def wait_started(self) -> None:
        self.ctl("wait", str(self.home / f"{self.name}.pid"), "--timeout", "60", timeout=70)

    def stop(self) -> None:
        """Halt the node, or kill what is left of it: only this node's own processes."""
        if self.process is None:
            return
        with suppress(AssertionError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=30)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        for pid, cmdline in processes():
            if "beam" in cmdline and f"{self.nodename} " in cmdline + " ":
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def processes() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every process on this machine (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                raw = (entry / "cmdline").read_bytes()
                yield int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")
