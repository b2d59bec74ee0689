"""A real fail2ban ban ends as a ``geo_cache`` row: ``fail2ban-server`` (Debian package
``fail2ban``) runs in the foreground with a config folder of this test's own (one polling sshd
jail on a temp log file, only the shipped ``bangui-geo`` action), failed logins are appended to
that log, and the banned IPs must reach the real services through the action and the CLI."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import iptocc
import pytest

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceProcess,
    async_poll,
    poll,
    read_rows,
    service_env,
    wait_for_topology,
)

pytestmark = pytest.mark.integration

ACTION = REPO_ROOT / "deploy" / "fail2ban" / "action.d" / "bangui-geo.conf"
SYSTEM_FILTERS = Path("/etc/fail2ban/filter.d")
# Public addresses, in the line format of fail2ban's own sshd sample log
# (fail2ban/tests/files/logs/sshd: "Failed password for invalid user ROOT from ... port ... ssh2").
BANNED = ("194.117.26.69", "211.188.220.49", "2606:2800:220:1:248:1893:25c8:1946")
NOT_BANNED = "198.51.100.77"  # one failure only, below maxretry


def fail2ban_server() -> str:
    found = shutil.which("fail2ban-server")
    if found is None:
        pytest.fail("fail2ban-server is not installed: apt-get install -y fail2ban", pytrace=False)
    return found


def write_config(folder: Path, run: Path, auth_log: Path, amqp_url: str) -> None:
    """fail2ban.conf, one jail, the sshd filter (copied from the package) and our action."""
    (folder / "filter.d").mkdir(parents=True)
    (folder / "action.d").mkdir()
    for name in ("sshd.conf", "common.conf"):
        shutil.copy(SYSTEM_FILTERS / name, folder / "filter.d" / name)
    shutil.copy(ACTION, folder / "action.d" / "bangui-geo.conf")
    (folder / "fail2ban.conf").write_text(
        "[Definition]\n"
        "loglevel = INFO\n"
        f"logtarget = {run / 'fail2ban.log'}\n"
        f"socket = {run / 'fail2ban.sock'}\n"
        f"pidfile = {run / 'fail2ban.pid'}\n"
        "dbfile = :memory:\n"
    )
    # The console script of the Python running the tests, as the README's install step uses it
    # from the project's virtualenv; the URL of this test's vhost goes in as the action option.
    console_script = Path(sys.executable).parent / "bangui-geo"
    assert console_script.exists(), f"{console_script} missing: pip install -e . first"
    (folder / "jail.conf").write_text(
        "[DEFAULT]\n"
        "ignoreip = 127.0.0.1/8 ::1\n"
        "[sshd]\n"
        "enabled = true\n"
        "backend = polling\n"
        f"logpath = {auth_log}\n"
        "filter = sshd\n"
        "maxretry = 2\n"
        "findtime = 10m\n"
        "bantime = 10m\n"
        f'action = bangui-geo[bangui_geo="{console_script}", amqp_url="{amqp_url}"]\n'
    )


class Fail2ban:
    def __init__(self, tmp_path: Path, amqp_url: str) -> None:
        self.run = tmp_path / "f2b-run"
        self.run.mkdir()
        self.config = tmp_path / "f2b-conf"
        self.auth_log = tmp_path / "auth.log"
        self.auth_log.touch()
        write_config(self.config, self.run, self.auth_log, amqp_url)
        self.log = self.run / "fail2ban.log"
        self.process: subprocess.Popen[bytes] | None = None
        # sshd's filter ties lines of one sshd pid together (one connection): a pid per line.
        self._pids = itertools.count(31600)

    def start(self) -> None:
        # fail2ban runs actions with its own environment: no GEO_* at all, so the broker URL
        # can only come from the action's option.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
        self.process = subprocess.Popen(
            [
                fail2ban_server(),
                *("-f", "-x", "-c", str(self.config)),
                *("-s", str(self.run / "fail2ban.sock"), "-p", str(self.run / "fail2ban.pid")),
            ],
            cwd=self.run,
            env=env,
            stdout=(self.run / "server.out").open("wb"),
            stderr=subprocess.STDOUT,
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

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def services(amqp_url: str, tmp_path: Path) -> Iterator[Path]:
    db_path = tmp_path / "geo_cache.sqlite3"
    processes = [
        ServiceProcess(name, service_env(amqp_url, db_path), tmp_path / f"{name}.log").start()
        for name in ("resolver", "timer", "persistence")
    ]
    try:
        yield db_path
    finally:
        for process in processes:
            if process.running:
                process.stop()


@pytest.fixture
async def tap(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue of the test's own bound to ip.seen: shows what the action published."""
    await wait_for_topology(amqp_url)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("test.fail2ban.tap", exclusive=True)
        await queue.bind("bangui", routing_key="ip.seen")
        yield queue
    finally:
        await connection.close()


async def test_a_fail2ban_ban_ends_as_a_geo_cache_row(
    services: Path, tap: aio_pika.abc.AbstractQueue, amqp_url: str, tmp_path: Path
) -> None:
    fail2ban = Fail2ban(tmp_path, amqp_url)
    fail2ban.start()
    try:
        poll(
            lambda: "Jail 'sshd' started" in fail2ban.log_text(),
            timeout=20,
            what=f"fail2ban jail started (log: {fail2ban.log}, {fail2ban.run / 'server.out'})",
        )
        for ip in BANNED:
            fail2ban.failed_logins(ip, 2)
        fail2ban.failed_logins(NOT_BANNED, 1)

        def rows() -> dict[str, tuple[Any, ...]] | None:
            found = read_rows(services)
            return found if set(BANNED) <= found.keys() else None

        found = await async_poll(
            rows, deadline_s=30, what=f"banned IPs in geo_cache (fail2ban log: {fail2ban.log})"
        )
        log_text = fail2ban.log_text()
    finally:
        fail2ban.stop()

    for ip in BANNED:
        assert f"NOTICE  [sshd] Ban {ip}" in log_text
        code = iptocc.country_code(ip)
        assert code is not None
        assert (found[ip][0], found[ip][5]) == (code, "resolved")
    assert NOT_BANNED not in found
    assert "Failed to execute ban" not in log_text

    bodies = []
    while (message := await tap.get(no_ack=True, fail=False)) is not None:
        bodies.append(json.loads(message.body))
    assert sorted(ip for b in bodies for ip in b["ips"]) == sorted(BANNED)
    assert {(b["jail"], b["source"]) for b in bodies} == {("sshd", "fail2ban")}
