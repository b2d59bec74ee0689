"""``bangui-geo agent`` against a real ``fail2ban-server`` writing its own database: every ban
reaches ``geo_cache`` through a cut path to the broker and a SIGKILL, and the agent keeps
following across an unban, a purge, a fail2ban restart and a replaced database file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    events,
    public_ips,
    service_env,
    wait_for_topology,
)
from bangui_geo.testing.agent import AgentProcess
from bangui_geo.testing.http import free_port, get, metric
from shared.amqp import declare_topology
from tests.integration.agent_support import Fail2banServer, TcpProxy

pytestmark = pytest.mark.integration

BANS = 2000
OUTAGE_S = 30.0


def health(port: int) -> int:
    """The status /health answers; 0 while nothing listens yet."""
    try:
        return get(port, "/health")[0]
    except urllib.error.URLError:
        return 0


def agent_env(amqp_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return service_env(amqp_url, tmp_path / "unused.sqlite3", **extra)


@pytest.fixture
def fail2ban(tmp_path: Path) -> Iterator[Fail2banServer]:
    server = Fail2banServer(tmp_path / "f2b")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    target = urlsplit(amqp_url)
    tcp = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()


async def test_every_ban_reaches_geo_cache_through_an_outage_and_a_sigkill(
    service_group: ServiceGroup,
    fail2ban: Fail2banServer,
    proxy: TcpProxy,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    await service_group.start_pipeline()
    ips = public_ips(BANS, seed=41)
    await wait_for_topology(amqp_url)
    await asyncio.to_thread(fail2ban.start)
    port = free_port()
    env = agent_env(proxy.url_for(amqp_url), tmp_path, GEO_METRICS_PORT=str(port))
    flags = [
        *("--fail2ban-db", str(fail2ban.database), "--state", str(tmp_path / "agent.json")),
        *("--poll-interval", "0.2", "--retry-max", "2"),
    ]
    agents = [AgentProcess(env, tmp_path / "agent.0.log", flags).start()]

    def cached(wanted: list[str]) -> int:
        return len(set(wanted) & service_group.rows().keys())

    try:
        await async_poll(  # connected before it has anything to send
            lambda: asyncio.to_thread(lambda: health(port) == 200),
            deadline_s=20,
            what="the idle agent healthy",
        )
        await fail2ban.ban_async(ips[:500])
        await async_poll(
            lambda: cached(ips[:500]) == 500, deadline_s=60, what="the first 500 bans cached"
        )
        assert (await asyncio.to_thread(get, port, "/health"))[0] == 200

        proxy.cut()
        cut_at = time.monotonic()
        await fail2ban.ban_async(ips[500:1500])
        await async_poll(
            lambda: asyncio.to_thread(lambda: health(port) == 503),
            deadline_s=20,
            what="the agent reporting the broker lost",
        )
        await asyncio.sleep(max(0.0, cut_at + OUTAGE_S / 2 - time.monotonic()))
        agents[0].kill()  # SIGKILL, holding 1000 unconfirmed bans
        agents.append(AgentProcess(env, tmp_path / "agent.1.log", flags).start())
        await asyncio.sleep(max(0.0, cut_at + OUTAGE_S - time.monotonic()))
        assert cached(ips[500:1500]) == 0, "published through a cut path?"
        proxy.restore()
        await fail2ban.ban_async(ips[1500:])

        await async_poll(
            lambda: cached(ips) == BANS, deadline_s=90, what=f"all {BANS} bans in geo_cache"
        )
        status, text = await asyncio.to_thread(get, port, "/metrics")
        assert status == 200
        assert (await asyncio.to_thread(get, port, "/health"))[0] == 200
    finally:
        for agent in agents:
            if agent.running:  # in a thread: the proxy runs on this loop
                await asyncio.to_thread(agent.stop)

    assert not set(ips) - service_group.rows().keys()  # 0 lost
    with sqlite3.connect(fail2ban.database) as db:
        assert db.execute("SELECT COUNT(DISTINCT ip) FROM bans").fetchone()[0] == BANS
    # the second agent resumed from the saved position: it sent the 1,500 after the first 500
    assert metric(text, "geo_agent_ips_published_total") >= 1500
    assert metric(text, "geo_agent_bans_read_total") >= 1500
    assert metric(text, "geo_agent_bans_read_total") < BANS  # not from the beginning
    assert metric(text, "geo_agent_lag_seconds") >= 0
    # the first one noticed the cut, idle or holding bans (whichever came first), then kept trying
    assert events(agents[0], "agent_connection_lost") or events(agents[0], "agent_publish_failed")
    assert events(agents[0], "agent_connect_failed")
    assert events(agents[1], "agent_connect_failed")  # started while the path was cut
    assert events(agents[1], "agent_broker_restored")
    state = json.loads((tmp_path / "agent.json").read_text())
    assert state["anchor"]["ip"] == ips[-1]


class Tap:
    """A queue of the test's own bound to ip.seen: every body the agent published."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.bodies: list[dict[str, object]] = []

    async def take(self) -> set[str]:
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            self.bodies.append(json.loads(message.body))
        return {str(ip) for body in self.bodies for ip in body["ips"]}  # type: ignore[attr-defined]

    async def wait_for(self, ips: list[str], what: str) -> None:
        async def arrived() -> bool:
            return set(ips) <= await self.take()

        await async_poll(arrived, deadline_s=30, what=what)


@pytest.fixture
async def tap(amqp_url: str) -> AsyncIterator[Tap]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await declare_topology(channel)
        queue = await channel.declare_queue("test.agent.tap", exclusive=True)
        await queue.bind("bangui", routing_key="ip.seen")
        yield Tap(queue)
    finally:
        await connection.close()


async def test_the_agent_follows_unbans_purges_restarts_and_a_replaced_file(
    fail2ban: Fail2banServer, tap: Tap, amqp_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "agent.json"
    state.write_text('{"format": 1, "database": ')  # corrupt: said, then from the beginning
    flags = ["--fail2ban-db", str(fail2ban.database), "--state", str(state)]
    flags += ["--poll-interval", "0.2"]
    env = agent_env(amqp_url, tmp_path)
    runs: list[AgentProcess] = []

    def agent() -> AgentProcess:
        runs.append(AgentProcess(env, tmp_path / f"agent.{len(runs)}.log", flags).start())
        return runs[-1]

    before, unbanned, reused, purged, restarted, replaced = (
        public_ips(3, seed=10),
        "41.20.0.1",
        public_ips(1, seed=30),
        public_ips(2, seed=40),
        public_ips(1, seed=50),
        public_ips(2, seed=60),
    )
    await asyncio.to_thread(fail2ban.start)
    try:
        await fail2ban.ban_async([*before, unbanned])  # already there when the agent starts
        first = agent()
        await tap.wait_for([*before, unbanned], "the backfill")
        first.stop()

        # While it is stopped: the newest ban goes (an unban deletes its row) and a new ban
        # takes its rowid; then a purge of every row, and two bans on rowids 1 and 2 again.
        await asyncio.to_thread(fail2ban.client, "set", "sshd", "unbanip", unbanned)
        await fail2ban.ban_async(reused)
        with sqlite3.connect(fail2ban.database) as db:
            (rowid,) = db.execute("SELECT rowid FROM bans WHERE ip = ?", (reused[0],)).fetchone()
        assert rowid == len(before) + 1  # the unbanned one's rowid, reused
        agent()
        await tap.wait_for(reused, "a ban on a reused rowid")
        with sqlite3.connect(fail2ban.database) as db:  # fail2ban's purge statement
            db.execute("DELETE FROM bans WHERE timeofban < ?", (int(time.time()) + 10,))
        await fail2ban.ban_async(purged)
        await tap.wait_for(purged, "bans after a purge of every row")

        await asyncio.to_thread(fail2ban.stop)
        await asyncio.to_thread(fail2ban.start)
        await fail2ban.ban_async(restarted)
        await tap.wait_for(restarted, "a ban after fail2ban restarted")

        await asyncio.to_thread(fail2ban.stop)
        fail2ban.database.rename(fail2ban.database.with_suffix(".old"))
        await asyncio.to_thread(fail2ban.start)  # a new, empty database
        await fail2ban.ban_async(replaced)
        await tap.wait_for(replaced, "bans in a replaced database file")
    finally:
        for run in runs:
            if run.running:
                run.stop()

    corrupt = events(runs[0], "agent_state_corrupt")
    assert len(corrupt) == 1
    assert "starting over from the first ban" in corrupt[0]["message"]
    assert events(runs[1], "agent_position_rewound")
    assert events(runs[1], "agent_database_replaced")
    bodies = tap.bodies
    assert {(b["source"], b["jail"]) for b in bodies} == {("fail2ban", "sshd")}
    assert all(str(b["seen_at"]).endswith("Z") for b in bodies)
