"""What the fail2ban and agent tests need around the services: a real ``fail2ban-server`` with a
config of the test's own (bans from failed logins in its log, or added with ``fail2ban-client set
JAIL banip``, many IPs per call), and a TCP proxy whose path to the broker can be cut."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from bangui_geo.testing import poll

SYSTEM_FILTERS = Path("/etc/fail2ban/filter.d")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install -y fail2ban", pytrace=False)
    return found


class Fail2banServer:
    """fail2ban in the foreground with a config folder of the test's own: one polling sshd jail
    on the empty log ``auth_log``. By default no actions and ``dbfile`` in ``folder`` (the file
    the agent follows); ``database=False`` keeps its database in memory, ``jail`` replaces the
    jail's ban options (e.g. an ``action = …`` line) and ``actions`` are copied into
    ``action.d``."""

    def __init__(
        self,
        folder: Path,
        *,
        database: bool = True,
        jail: str = "bantime = 1h\n",
        actions: Sequence[Path] = (),
    ) -> None:
        self.folder = folder
        self.config = folder / "conf"
        self.run = folder / "run"
        self.database = folder / "fail2ban.sqlite3"
        self.socket = self.run / "fail2ban.sock"
        self.log = self.run / "fail2ban.log"
        self.auth_log = folder / "auth.log"
        self.process: subprocess.Popen[bytes] | None = None
        # sshd's filter ties lines of one sshd pid together (one connection): a pid per line.
        self._pids = itertools.count(31600)
        (self.config / "filter.d").mkdir(parents=True)
        (self.config / "action.d").mkdir()
        self.run.mkdir()
        for name in ("sshd.conf", "common.conf"):
            shutil.copy(SYSTEM_FILTERS / name, self.config / "filter.d" / name)
        for action in actions:
            shutil.copy(action, self.config / "action.d" / action.name)
        self.auth_log.touch()
        (self.config / "fail2ban.conf").write_text(
            "[Definition]\n"
            "loglevel = INFO\n"
            f"logtarget = {self.log}\n"
            f"socket = {self.socket}\n"
            f"pidfile = {self.run / 'fail2ban.pid'}\n"
            f"dbfile = {self.database if database else ':memory:'}\n"
            "dbpurgeage = 1d\n"
        )
        (self.config / "jail.conf").write_text(
            "[DEFAULT]\n"
            "ignoreip = 127.0.0.1/8 ::1\n"
            "[sshd]\n"
            "enabled = true\n"
            "backend = polling\n"
            f"logpath = {self.auth_log}\n"
            "filter = sshd\n" + jail
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def failed_logins(self, ip: str, count: int) -> None:
        """``count`` lines as sshd writes them, stamped now (findtime must cover them)."""
        stamp = time.strftime("%b %d %H:%M:%S")
        with self.auth_log.open("a") as log:
            for n in range(count):
                log.write(
                    f"{stamp} belka sshd[{next(self._pids)}]: Failed password for invalid user "
                    f"ROOT from {ip} port {50273 + n} ssh2\n"
                )

    def start(self) -> None:
        started = (
            self.log.read_text(errors="replace").count("Jail 'sshd' started")
            if (self.log.exists())
            else 0
        )
        self.process = subprocess.Popen(
            [
                _tool("fail2ban-server"),
                *("-f", "-x", "-c", str(self.config)),
                *("-s", str(self.socket), "-p", str(self.run / "fail2ban.pid")),
            ],
            cwd=self.run,
            env={k: v for k, v in os.environ.items() if not k.startswith("GEO_")},
            stdout=(self.run / "server.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        poll(
            lambda: (
                self.log.exists()
                and self.log.read_text(errors="replace").count("Jail 'sshd' started") > started
            ),
            timeout=30,
            what=f"fail2ban jail started (log: {self.log})",
        )

    def client(self, *args: str) -> str:
        done = subprocess.run(
            [_tool("fail2ban-client"), "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"fail2ban-client {args[:3]}: {done.stdout}{done.stderr}"
        return done.stdout

    def ban(self, ips: Sequence[str], jail: str = "sshd") -> None:
        for start in range(0, len(ips), 250):
            self.client("set", jail, "banip", *ips[start : start + 250])

    async def ban_async(self, ips: Sequence[str], jail: str = "sshd") -> None:
        await asyncio.to_thread(self.ban, ips, jail)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class TcpProxy:
    """Forwards a local port to the broker; ``cut()`` aborts every connection and refuses new
    ones (they are accepted and dropped at once) until ``restore()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, amqp_url: str) -> str:
        parts = urlsplit(amqp_url)
        credentials = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{self.port}"))

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for each in (writer, up_writer):
            self._open.discard(each)
            each.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.cut_off:
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
