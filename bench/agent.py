"""Figure 7: the fail2ban agent. Backfill: a fail2ban database (fail2ban's own schema, made by
its ``Fail2BanDb``) holding N bans, read by ``bangui-geo agent`` into confirmed ``ip.seen``
messages, IPs/s from the agent's start to its last confirmed batch (its log timestamps). Bare
baseline: the same rows read with ``sqlite3`` and published as the same messages with confirms by
one aio-pika channel, in this process. Delay: with the agent caught up, bans are written one by
one the way fail2ban writes them (insert + commit); each one's delay is its ``ip.seen`` delivery
to a queue of ours minus its commit. It depends mostly on ``--poll-interval`` (default 0.5 s).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bangui_geo.testing import ServiceFailed, event_time, public_ips, service_env
from bangui_geo.testing.agent import AgentProcess
from bench.broker import connect, declare_bare_queue
from bench.latency import percentile
from bench.report import Figure, Target
from shared import topology
from shared.amqp import declare_topology

TAP = "bench.bare.agent"
POLL_INTERVAL_S = 0.5  # the agent's default
BAN_RATE = 20.0  # bans a second in the delay phase
FAIL2BAN_PYTHON = "/usr/bin/python3"  # the fail2ban package's Python


def make_database(path: Path, ips: list[str], start: int) -> None:
    """fail2ban's schema by fail2ban's own code, then ``ips`` as bans, a second apart."""
    subprocess.run(
        [
            FAIL2BAN_PYTHON,
            "-c",
            "import sys; from fail2ban.server.database import Fail2BanDb; Fail2BanDb(sys.argv[1])",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR IGNORE INTO jails(name, enabled) VALUES('sshd', 1)")
        db.executemany(
            "INSERT INTO bans(jail, ip, timeofban, bantime, bancount, data) "
            "VALUES('sshd', ?, ?, 600, 1, '{\"matches\": [], \"failures\": 5}')",
            ((ip, start + n) for n, ip in enumerate(ips)),
        )


async def bare_backfill(amqp_url: str, path: Path) -> float:
    """IPs/s of the bare path: read every row, publish 1000-IP messages, gather the confirms."""
    connection = await connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.EXCHANGE)
        started = time.perf_counter()
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT ip, timeofban FROM bans ORDER BY rowid").fetchall()
        bodies = [
            json.dumps({"ips": [ip for ip, _ in rows[i : i + 1000]], "source": "fail2ban"}).encode()
            for i in range(0, len(rows), 1000)
        ]
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    topology.IP_SEEN,
                    timeout=30,
                )
                for body in bodies
            )
        )
        return len(rows) / (time.perf_counter() - started)
    finally:
        await connection.close()


class BanWriter:
    """Writes bans as fail2ban does (its pragmas, one insert + commit per ban) at a steady rate
    in a thread, noting each commit's time."""

    def __init__(self, path: Path, ips: list[str], rate: float) -> None:
        self.path, self.ips, self.rate = path, ips, rate
        self.committed: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="ban-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(timeout=120)

    def _run(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA journal_mode = MEMORY")
        try:
            start = time.perf_counter()
            for n, ip in enumerate(self.ips):
                time.sleep(max(0.0, start + n / self.rate - time.perf_counter()))
                with db:
                    db.execute(
                        "INSERT INTO bans(jail, ip, timeofban, bantime, bancount, data) "
                        "VALUES('sshd', ?, ?, 600, 1, '{}')",
                        (ip, int(time.time())),
                    )
                self.committed[ip] = time.perf_counter()
        finally:
            db.close()


async def run_agent_bench(bans: int, delays: int, amqp_url: str, workdir: Path) -> list[Figure]:
    backfill = Figure(
        "agent_backfill",
        f"7. agent backfill: {bans:,} fail2ban bans -> confirmed ip.seen (1000 IPs a message)",
        "IPs/s",
        Target("value>=", 20_000),
        baseline_is="sqlite3 read + aio-pika publish of the same messages, confirms gathered",
    )
    p50 = Figure(
        "agent_ban_delay_p50",
        f"7b. fail2ban ban committed -> its ip.seen delivered, {delays} bans at {BAN_RATE:g}/s, "
        f"agent polling every {POLL_INTERVAL_S:g} s",
        "ms",
    )
    p99 = Figure("agent_ban_delay_p99", "7b. the same, 99th percentile", "ms")
    database = workdir / "fail2ban.sqlite3"
    ips = public_ips(bans + delays, seed=7)
    await asyncio.to_thread(make_database, database, ips[:bans], int(time.time()) - bans)

    connection = await connect(amqp_url)
    agent: AgentProcess | None = None
    try:
        channel = await connection.channel()
        await declare_topology(channel)
        await declare_bare_queue(channel, TAP)
        tap = await channel.get_queue(TAP)
        resolver_queue = await channel.get_queue(topology.RESOLVER_IP_SEEN.name)
        backfill.baseline = await bare_backfill(amqp_url, database)
        await tap.purge()

        env = service_env(amqp_url, workdir / "unused.sqlite3")
        flags = ["--fail2ban-db", str(database), "--state", str(workdir / "agent-state.json")]
        agent = AgentProcess(env, workdir / "agent.log", flags).start()
        deadline = time.monotonic() + 120
        while not _published_through(agent, bans):
            if not agent.running:
                raise ServiceFailed(f"the agent exited: {agent.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise ServiceFailed(f"backfill not done after 120 s (log {agent.log_path})")
            await asyncio.sleep(0.05)
        started = event_time(_events(agent, "agent_started")[0])
        finished = event_time(_events(agent, "agent_bans_published")[-1])
        backfill.project = bans / (finished - started)
        batches = _events(agent, "agent_bans_published")
        backfill.metrics.update(batches=len(batches), seconds=finished - started)
        backfill.details.append(
            f"{len(batches)} confirmed batches of up to 10,000 bans in {finished - started:.2f} s "
            "(each: read, group, publish, confirms, state fsync + rename)"
        )
        await tap.purge()
        await resolver_queue.purge()

        delivered: dict[str, float] = {}

        async def on_message(message: AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            for ip in json.loads(message.body)["ips"]:
                delivered.setdefault(ip, now)
            await message.ack()

        await tap.consume(on_message)
        writer = BanWriter(database, ips[bans:], BAN_RATE)
        writer.start()
        deadline = time.monotonic() + delays / BAN_RATE + 30
        while len(delivered) < delays:
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{len(delivered)} of {delays} live bans delivered")
            await asyncio.sleep(0.05)
        await asyncio.to_thread(writer.join)
        delay_ms = [1000 * (delivered[ip] - writer.committed[ip]) for ip in ips[bans:]]
        p50.project, p99.project = percentile(delay_ms, 0.5), percentile(delay_ms, 0.99)
        p50.metrics.update(min_ms=min(delay_ms), max_ms=max(delay_ms))
        p50.details.append(
            f"min {min(delay_ms):.0f} ms, max {max(delay_ms):.0f} ms: a ban waits on average "
            "half a poll interval, then one read, one publish and its confirm"
        )
    finally:
        if agent is not None and agent.running:
            await asyncio.to_thread(agent.stop)
        await connection.close()
    return [backfill, p50, p99]


def _events(agent: AgentProcess, name: str) -> list[dict[str, object]]:
    return [e for e in agent.log_events() if e.get("event") == name]


def _published_through(agent: AgentProcess, rowid: int) -> bool:
    return any(
        int(str(e.get("through_rowid", 0))) >= rowid for e in _events(agent, "agent_bans_published")
    )
