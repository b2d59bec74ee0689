"""The publisher client and the ``bangui-geo`` CLI against a real RabbitMQ (fresh vhost) and the
real services: the README example as written, publish then stats, dead letters listed and
replayed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceGroup,
    async_poll,
    drain_queue,
    publish,
    read_rows,
    ready_count,
)
from bangui_geo.testing.ips import known_public_ips
from shared import amqp, topology
from shared.client import BrokerUnreachable, GeoPublisher, PublishFailed

pytestmark = pytest.mark.integration

# The README's client section; moves into README.md itself when the docs are merged.
SNIPPET_DOC = REPO_ROOT / "README.md"
SNIPPET_MARKER = "<!-- client-example"


def readme_example() -> str:
    text = SNIPPET_DOC.read_text()
    after = text[text.index(SNIPPET_MARKER) :]
    match = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert match is not None, f"no python block after {SNIPPET_MARKER} in {SNIPPET_DOC}"
    return match.group(1)


async def rows_for(group: ServiceGroup, ips: set[str], what: str) -> dict[str, tuple[Any, ...]]:
    def present() -> dict[str, tuple[Any, ...]] | None:
        rows = group.rows()
        return rows if ips <= rows.keys() else None

    found: dict[str, tuple[Any, ...]] = await async_poll(present, deadline_s=20, what=what)
    return found


async def test_readme_client_example_runs_as_written(
    service_group: ServiceGroup, tmp_path: Path
) -> None:
    await service_group.start_pipeline()
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    env["GEO_AMQP_URL"] = service_group.amqp_url
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = await rows_for(service_group, {"203.0.113.7", "198.51.100.1", "2001:db8::1"}, "example")
    assert {rows[ip][5] for ip in ("203.0.113.7", "198.51.100.1", "2001:db8::1")} == {"not_global"}


@pytest.fixture
async def topology_only(amqp_url: str) -> AsyncIterator[str]:
    """The services' topology declared in the vhost, no service consuming it."""
    connection = await amqp.connect(amqp_url, attempts=1)
    try:
        await amqp.declare_topology(await connection.channel())
        yield amqp_url
    finally:
        await connection.close()


async def test_client_validates_first_splits_and_confirms(topology_only: str) -> None:
    url = topology_only
    ips = [f"8.{n // 256}.{n % 256}.1" for n in range(2500)]
    async with GeoPublisher.connect(url) as geo:
        with pytest.raises(ValueError, match=r"ips\[2\]: not an IPv4 or IPv6 address: 'nope'"):
            await geo.publish_seen(["1.1.1.1", "9.9.9.9", "nope"])
        assert await ready_count(url, "geo.resolver.ip_seen") == 0
        assert await geo.publish_seen(ips, jail="sshd", source="importer") == 2500
        assert await geo.publish_seen("::ffff:1.2.3.4") == 1
    # Confirmed means queued: counted right away, no polling.
    assert await ready_count(url, "geo.resolver.ip_seen") == 4
    messages = await drain_queue(url, "geo.resolver.ip_seen")
    bodies = [json.loads(m.body) for m in messages]
    assert [len(b.get("ips", [])) for b in bodies] == [1000, 1000, 500, 0]
    assert [ip for b in bodies[:3] for ip in b["ips"]] == ips
    assert {(b["jail"], b["source"]) for b in bodies[:3]} == {("sshd", "importer")}
    assert bodies[3] == {"ip": "1.2.3.4"}
    assert {m.delivery_mode for m in messages} == {aio_pika.DeliveryMode.PERSISTENT}


async def test_client_says_what_is_missing_on_the_broker(amqp_url: str) -> None:
    with pytest.raises(BrokerUnreachable, match="exchange 'bangui' does not exist"):
        await GeoPublisher.open(amqp_url)
    connection = await amqp.connect(amqp_url, attempts=1)
    try:  # the exchange without its queues: an unroutable ip.seen must not vanish silently
        channel = await connection.channel()
        await channel.declare_exchange("bangui", aio_pika.ExchangeType.TOPIC, durable=True)
        async with GeoPublisher.connect(amqp_url, confirm_timeout=5) as geo:
            with pytest.raises(PublishFailed, match=r"ip\.seen was not routed"):
                await geo.publish_seen("8.8.8.8")
    finally:
        await connection.close()


async def test_cli_publish_then_stats_lookup(service_group: ServiceGroup, tmp_path: Path) -> None:
    await service_group.start_pipeline()
    ips = [f"{a}.{b}.7.9" for a in (8, 31, 41, 81, 151, 200) for b in range(0, 250)]
    ban_log = tmp_path / "fail2ban.log"
    ban_log.write_text(
        "2026-11-22 12:00:03,245 fail2ban.actions        [812]: NOTICE  [sshd] Ban 1.0.0.1\n"
        "2026-11-22 12:00:04,001 fail2ban.actions        [812]: NOTICE  [sshd] Unban 1.0.0.2\n"
        "2026-11-22 12:01:10,377 fail2ban.actions        [812]: NOTICE  [nginx] Ban 2a00:1450::5\n"
    )
    done = await asyncio.to_thread(
        service_group.cli, "publish", "--source", "import", "-", stdin="\n".join(ips) + "\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "published 1,500 IPs as ip.seen\n"
    assert "100% 1,500/1,500 IPs" in done.stderr  # the progress bar, above 1,000 IPs
    done = await asyncio.to_thread(service_group.cli, "publish", "--fail2ban-log", str(ban_log))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "published 2 IPs as ip.seen (jail nginx, sshd)\n"
    assert "%" not in done.stderr

    expected = {*ips, "1.0.0.1", "2a00:1450::5"}
    rows = await rows_for(service_group, expected, "published rows")
    assert "1.0.0.2" not in rows  # an Unban line is not a ban

    # The by-country table the README demo ends with, checked against the file itself.
    console_script = Path(sys.executable).parent / "bangui-geo"
    done = await asyncio.to_thread(
        subprocess.run,
        [str(console_script), "stats", "--all"],
        env=service_group.env_for(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(service_group.db_path) as db:
        by_country = db.execute(
            "SELECT country_code, COUNT(*) FROM geo_cache WHERE country_code IS NOT NULL"
            " GROUP BY country_code"
        ).fetchall()
        unresolved = db.execute(
            "SELECT COUNT(*) FROM geo_cache WHERE country_code IS NULL"
        ).fetchone()[0]
    printed = {
        line.split()[0]: int(line.split()[-2].replace(",", ""))
        for line in done.stdout.splitlines()[2:]
        if re.match(r"^[A-Z]{2} ", line)
    }
    assert printed == dict(by_country)
    assert len(printed) >= 3
    total = sum(printed.values()) + unresolved
    assert total == len(expected)
    assert re.search(rf"^\s+total\s+{total:,}\s+100\.0%$", done.stdout, re.MULTILINE)
    assert f"unresolved: {unresolved:,}" in done.stdout
    assert re.search(r"^newest row: \S+Z \(\d+ s ago\)$", done.stdout, re.MULTILINE)

    done = await asyncio.to_thread(service_group.cli, "lookup", "8.0.7.9", "192.0.2.200")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    code, name = rows["8.0.7.9"][0], rows["8.0.7.9"][1]
    assert lines[2].split()[:2] == ["8.0.7.9", code]
    assert f"  {name}  " in lines[2]
    assert lines[3].split(maxsplit=1) == ["192.0.2.200", "not in geo_cache"]


async def dead_letter_directly(
    url: str, body: dict[str, Any], original_key: str, *, at: datetime | None = None
) -> None:
    """What a service does when it rejects a message, done by hand with a VALID body (``at``:
    when it was dead-lettered, the AMQP timestamp a service sets)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE)
        await dlx.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                headers={
                    topology.REASON_HEADER: "handler failed on redelivery: RuntimeError()",
                    topology.SERVICE_HEADER: "resolver",
                    topology.QUEUE_HEADER: "geo.resolver.ip_seen",
                    topology.ROUTING_KEY_HEADER: original_key,
                },
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=at or datetime.now(UTC),
            ),
            routing_key="ip.seen",  # a service dead-letters under what its queue is for
        )
    finally:
        await connection.close()


async def test_dead_letters_list_and_replay(service_group: ServiceGroup) -> None:
    await service_group.start_pipeline()
    url = service_group.amqp_url
    await publish(url, "ip.seen", [{"ip": "nope"}])
    await async_poll(
        lambda: ready_count(url, "geo.dead_letter"), deadline_s=10, what="malformed dead-lettered"
    )
    await dead_letter_directly(url, {"ips": ["9.9.9.9"]}, "ip.seen")
    assert await ready_count(url, "geo.dead_letter") == 2

    done = await asyncio.to_thread(service_group.cli, "dead-letters", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "geo.dead_letter: 2 messages"
    assert lines[1] == "#1  routing key ip.seen  rejected by resolver from geo.resolver.ip_seen"
    assert lines[2] == "    reason: ip: Value error, not an IPv4 or IPv6 address: 'nope'"
    assert lines[3] == '    body (14 bytes): {"ip": "nope"}'
    assert lines[5] == "    reason: handler failed on redelivery: RuntimeError()"
    assert await ready_count(url, "geo.dead_letter") == 2  # listing loses nothing

    done = await asyncio.to_thread(service_group.cli, "dead-letters", "replay", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "#2  would replay to ip.seen" in done.stdout
    assert await ready_count(url, "geo.dead_letter") == 2

    done = await asyncio.to_thread(service_group.cli, "dead-letters", "replay")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "replayed 2 of 2; 0 kept; 0 left in geo.dead_letter"
    rows = await rows_for(service_group, {"9.9.9.9"}, "the replayed dead letter's row")
    assert rows["9.9.9.9"][5] == "resolved"
    # The malformed one is rejected again and is back, alone, with its reason.
    await async_poll(
        lambda: ready_count(url, "geo.dead_letter"), deadline_s=10, what="malformed back"
    )
    back = await drain_queue(url, "geo.dead_letter")
    assert [json.loads(m.body) for m in back] == [{"ip": "nope"}]


async def test_backup_during_a_stream_is_consistent(
    service_group: ServiceGroup, tmp_path: Path
) -> None:
    """Backups taken while persistence commits: each copy passes integrity_check, holds a
    snapshot (never fewer rows than the copy before it, every row as the final table has it)."""
    await service_group.start_pipeline()
    ips = known_public_ips(30_000, seed=23)
    bodies = [{"ips": ips[i : i + 250]} for i in range(0, len(ips), 250)]

    first_copy = asyncio.Event()

    async def stream() -> None:
        for start in range(0, len(bodies), 4):
            if start == len(bodies) // 4:  # the rest only once the first copy is taken
                await first_copy.wait()
            await publish(service_group.amqp_url, "ip.seen", bodies[start : start + 4])
            await asyncio.sleep(0.05)

    await async_poll(service_group.db_path.exists, deadline_s=20, what="the database file")
    publishing = asyncio.create_task(stream())
    await async_poll(service_group.row_count, deadline_s=20, what="the first rows committed")
    copies: list[dict[str, tuple[Any, ...]]] = []
    while not publishing.done() or len(copies) < 2:
        target = tmp_path / f"backup-{len(copies)}.sqlite3"
        done = await asyncio.to_thread(service_group.cli, "backup", str(target))
        assert done.returncode == 0, done.stderr
        with sqlite3.connect(target) as copy:
            assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copies.append(read_rows(target))
        first_copy.set()
        assert done.stdout.startswith(f"backed up {len(copies[-1]):,} rows of ")
    await publishing
    final = await rows_for(service_group, set(ips), "every streamed IP")
    assert len(copies) >= 2
    sizes = [len(copy) for copy in copies]
    assert sizes == sorted(sizes)
    assert 0 < sizes[0] < len(ips)  # the first copy was taken mid-stream
    for copy in copies:
        assert all(final[ip] == values for ip, values in copy.items())


async def test_dead_letters_purge_by_age_and_reason(service_group: ServiceGroup) -> None:
    await service_group.start_pipeline()
    url = service_group.amqp_url
    await publish(url, "ip.seen", [{"ip": "nope"}, {"ips": ["8.8.8.8", "256.0.0.1"]}])
    for n in range(5):  # handler failures, dead-lettered two days ago
        await dead_letter_directly(
            url, {"ip": f"9.9.9.{n}"}, "ip.seen", at=datetime.now(UTC) - timedelta(days=2)
        )

    async def seven() -> bool:
        return await ready_count(url, "geo.dead_letter") == 7

    await async_poll(seven, deadline_s=15, what="7 dead letters")

    # A dry run with --limit 2 counts the queue, not the page.
    done = await asyncio.to_thread(
        service_group.cli, "dead-letters", "replay", "--dry-run", "--limit", "2"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("; 7 left in geo.dead_letter")

    # Without --yes and without a terminal to ask on: refused, nothing removed.
    done = await asyncio.to_thread(service_group.cli, "dead-letters", "purge", "--older-than", "1d")
    assert done.returncode == 2
    assert done.stderr == (
        "bangui-geo: purge 5 of the 7 dead letters in geo.dead_letter (older than 1d)"
        "? pass --yes to confirm (stdin is not a terminal); nothing was purged\n"
    )
    assert await ready_count(url, "geo.dead_letter") == 7

    done = await asyncio.to_thread(
        service_group.cli, "dead-letters", "purge", "--reason", "not an ipv4", "--yes"
    )
    assert (done.returncode, done.stdout) == (
        0,
        "purged 2 dead letters; 5 left in geo.dead_letter\n",
    )
    done = await asyncio.to_thread(
        service_group.cli, "dead-letters", "purge", "--older-than", "3d", "--yes"
    )
    assert done.stdout == "purged 0 dead letters; 5 left in geo.dead_letter\n"
    done = await asyncio.to_thread(
        service_group.cli,
        "dead-letters",
        "purge",
        "--older-than",
        "1d",
        "--reason",
        "RuntimeError",
        "-y",
    )
    assert done.stdout == "purged 5 dead letters; 0 left in geo.dead_letter\n"
    assert await ready_count(url, "geo.dead_letter") == 0
    done = await asyncio.to_thread(service_group.cli, "dead-letters", "purge", "--older-than", "x")
    assert done.returncode == 2
    assert "is not an age like 30m, 12h or 7d" in done.stderr
