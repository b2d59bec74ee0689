"""A real fail2ban ban ends as a ``geo_cache`` row: ``fail2ban-server`` (Debian package
``fail2ban``) runs in the foreground with a config folder of this test's own (one polling sshd
jail on a temp log file, only the shipped ``bangui-geo`` action), failed logins are appended to
that log, and the banned IPs must reach the real services through the action and the CLI.
The server is the one the agent tests run (``agent_support.Fail2banServer``)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import iptocc
import pytest

from bangui_geo.testing import REPO_ROOT, ServiceGroup, async_poll
from tests.integration.agent_support import Fail2banServer

pytestmark = pytest.mark.integration

ACTION = REPO_ROOT / "deploy" / "fail2ban" / "action.d" / "bangui-geo.conf"
# Public addresses, in the line format of fail2ban's own sshd sample log
# (fail2ban/tests/files/logs/sshd: "Failed password for invalid user ROOT from ... port ... ssh2").
BANNED = ("194.117.26.69", "211.188.220.49", "2606:2800:220:1:248:1893:25c8:1946")
NOT_BANNED = "198.51.100.77"  # one failure only, below maxretry


def with_the_action(tmp_path: Path, amqp_url: str) -> Fail2banServer:
    """fail2ban with its database in memory and only the shipped ``bangui-geo`` action, given
    the URL of this test's vhost as its option."""
    # The console script of the Python running the tests, as the README's install step uses it
    # from the project's virtualenv. fail2ban runs actions with its own environment: no GEO_*
    # at all, so the broker URL can only come from the action's option.
    console_script = Path(sys.executable).parent / "bangui-geo"
    assert console_script.exists(), f"{console_script} missing: pip install -e . first"
    return Fail2banServer(
        tmp_path / "f2b",
        database=False,
        actions=[ACTION],
        jail=(
            "maxretry = 2\n"
            "findtime = 10m\n"
            "bantime = 10m\n"
            f'action = bangui-geo[bangui_geo="{console_script}", amqp_url="{amqp_url}"]\n'
        ),
    )


@pytest.fixture
async def tap(service_group: ServiceGroup) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """The services running, and a queue of the test's own bound to ip.seen: shows what the
    action published."""
    await service_group.start_pipeline()
    amqp_url = service_group.amqp_url
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("test.fail2ban.tap", exclusive=True)
        await queue.bind("bangui", routing_key="ip.seen")
        yield queue
    finally:
        await connection.close()


async def test_a_fail2ban_ban_ends_as_a_geo_cache_row(
    service_group: ServiceGroup, tap: aio_pika.abc.AbstractQueue, tmp_path: Path
) -> None:
    fail2ban = with_the_action(tmp_path, service_group.amqp_url)
    try:
        await asyncio.to_thread(fail2ban.start)  # returns once the jail has started
        for ip in BANNED:
            fail2ban.failed_logins(ip, 2)
        fail2ban.failed_logins(NOT_BANNED, 1)

        def rows() -> dict[str, tuple[Any, ...]] | None:
            found = service_group.rows()
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
