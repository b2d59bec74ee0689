"""Bring the whole pipeline up locally, feed it a sample of ip.seen events, watch rows arrive
and print the "bans by country" summary. Run through ``scripts/demo`` (which also installs the
project and starts RabbitMQ); ``--once`` exits after the summary instead of running on.

The demo runs in a vhost of its own (``bangui-geo-demo`` on the broker of ``GEO_AMQP_URL``),
created at start and deleted at the end, so a rerun starts from empty queues and counts only the
rows it wrote itself."""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("persistence", "resolver", "timer")
DEMO_VHOST = "bangui-geo-demo"
# Well-known addresses in the sample, so `bangui-geo lookup 8.8.8.8` finds a row afterwards.
KNOWN = ["8.8.8.8", "1.1.1.1", "9.9.9.9"]


class DemoVhost:
    """The demo's own vhost on the broker, through the management API or else rabbitmqctl."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.user = unquote(parts.username or "guest")
        self.password = unquote(parts.password or "guest")
        self.api = f"http://{parts.hostname or 'localhost'}:15672"
        self.url = urlunsplit(
            (parts.scheme, parts.netloc, "/" + quote(DEMO_VHOST, safe=""), "", "")
        )

    def _call(self, method: str, path: str, body: object | None = None) -> None:
        request = urllib.request.Request(
            self.api + path, None if body is None else json.dumps(body).encode(), method=method
        )
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def _ctl(self, *args: str) -> None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise RuntimeError(
                f"cannot manage vhost {DEMO_VHOST}: no management API at {self.api} and no "
                "rabbitmqctl (run `rabbitmq-plugins enable rabbitmq_management`)"
            )
        subprocess.run([ctl, *args], check=True, capture_output=True)

    def create(self) -> None:
        self.delete()  # what an interrupted earlier run left
        name = quote(DEMO_VHOST, safe="")
        try:
            self._call("PUT", f"/api/vhosts/{name}")
            self._call(
                "PUT",
                f"/api/permissions/{name}/{quote(self.user, safe='')}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
        except (urllib.error.URLError, OSError):
            self._ctl("add_vhost", DEMO_VHOST)
            self._ctl("set_permissions", "-p", DEMO_VHOST, self.user, ".*", ".*", ".*")

    def delete(self) -> None:
        try:
            self._call("DELETE", f"/api/vhosts/{quote(DEMO_VHOST, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        except (urllib.error.URLError, OSError):
            if shutil.which("rabbitmqctl"):
                subprocess.run(
                    ["rabbitmqctl", "delete_vhost", DEMO_VHOST], check=False, capture_output=True
                )


def sample_events(count: int, seed: int = 2026) -> tuple[list[bytes], set[str]]:
    """Mixed ip.seen bodies (single, bulk, IPv6, mapped, private, duplicates, two malformed)."""
    rng = random.Random(seed)
    v4: list[str] = []
    while len(v4) < count:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            v4.append(str(address))
    v6 = [
        f"2a0{rng.randint(0, 9)}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
        for _ in range(50)
    ]
    v4 += KNOWN
    private = ["10.0.0.8", "192.168.1.20", "172.16.5.4", "127.0.0.1", "fd12:3456::1", "100.64.0.9"]
    mapped = [f"::ffff:{ip}" for ip in v4[:20]]
    bodies: list[dict[str, object]] = [{"ip": ip, "source": "demo", "jail": "sshd"} for ip in v4]
    bodies += [{"ips": v4[i : i + 250]} for i in range(0, min(len(v4), 1000), 250)]  # duplicates
    bodies += [{"ip": ip} for ip in v6 + private + mapped]
    rng.shuffle(bodies)
    raw = [json.dumps(b).encode() for b in bodies]
    raw += [b"this is not json", b'{"ip": "999.1.2.3"}']  # -> geo.dead_letter
    expected = set(v4) | {str(ipaddress.ip_address(ip)) for ip in v6} | set(private)
    return raw, expected


async def publish(url: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("bangui")
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    exchange.publish(aio_pika.Message(b, delivery_mode=2), "ip.seen")
                    for b in bodies[start : start + 500]
                )
            )


async def wait_for_exchange(url: str, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            connection = await aio_pika.connect(url)
            async with connection:
                channel = await connection.channel()
                await channel.get_exchange("bangui", ensure=True)
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def dead_letters(url: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("geo.dead_letter", passive=True)
        return int(queue.declaration_result.message_count or 0)


def count_rows(db_path: Path, ips: set[str], since: str) -> tuple[int, int]:
    """(rows for the sample's IPs written by this run, of which resolved)."""
    if not db_path.exists():
        return 0, 0
    with sqlite3.connect(db_path, timeout=5) as db:
        try:
            rows = db.execute(
                "SELECT ip, country_code FROM geo_cache WHERE cached_at >= ?", (since,)
            ).fetchall()
        except sqlite3.OperationalError:
            return 0, 0
    mine = [r for r in rows if r[0] in ips]
    return len(mine), sum(1 for r in mine if r[1])


def by_country(db_path: Path, top: int = 15) -> str:
    with sqlite3.connect(db_path, timeout=5) as db:
        rows = db.execute(
            "SELECT COALESCE(country_code, '--'), COALESCE(country_name, '(unresolved)'), COUNT(*)"
            " FROM geo_cache GROUP BY 1, 2 ORDER BY 3 DESC, 1"
        ).fetchall()
    total = sum(r[2] for r in rows)
    lines = [f"{'code':<5} {'country':<40} {'IPs':>7}", "-" * 54]
    lines += [f"{code:<5} {name[:40]:<40} {n:>7}" for code, name, n in rows[:top]]
    rest = sum(r[2] for r in rows[top:])
    if rest:
        lines.append(f"{'':<5} {f'({len(rows) - top} more countries)':<40} {rest:>7}")
    lines += ["-" * 54, f"{'':<5} {'total':<40} {total:>7}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the summary")
    parser.add_argument("--events", type=int, default=2500, help="single-IP events to publish")
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("GEO_FLUSH_INTERVAL", "2")
    env.setdefault("GEO_RE_RESOLVE_INTERVAL", "30")
    env.setdefault("GEO_LOG_FORMAT", "json")
    vhost = DemoVhost(env.get("GEO_AMQP_URL") or "amqp://guest:guest@localhost:5672/")
    vhost.create()
    url = env["GEO_AMQP_URL"] = vhost.url
    db_path = Path(env.setdefault("GEO_DB_PATH", "data/geo_cache.sqlite3"))
    if not db_path.is_absolute():
        db_path = REPO_ROOT / db_path
    logs = db_path.parent / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)

    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    print(f"==> starting resolver, timer and persistence on vhost {DEMO_VHOST} (logs in {logs})")
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=(logs / f"{name}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        for name in SERVICES
    }
    try:
        asyncio.run(wait_for_exchange(url))
        bodies, expected = sample_events(args.events)
        print(f"==> publishing {len(bodies)} ip.seen messages ({len(expected)} distinct IPs)")
        asyncio.run(publish(url, bodies))
        deadline = time.monotonic() + 90
        last = (-1, -1)
        while time.monotonic() < deadline:
            rows, resolved = count_rows(db_path, expected, since)
            if (rows, resolved) != last:
                print(f"    geo_cache: {rows:>5} of {len(expected)} rows, {resolved} resolved")
                last = (rows, resolved)
            if rows == len(expected):
                break
            dead = [n for n, p in processes.items() if p.poll() is not None]
            if dead:
                print(f"service(s) exited early: {dead}; see {logs}", file=sys.stderr)
                return 1
            time.sleep(1)
        else:
            print("rows did not all arrive within 90 s", file=sys.stderr)
            return 1
        print("\n==> bans by country (geo_cache)\n" + by_country(db_path))
        print(f"\n==> geo.dead_letter holds {asyncio.run(dead_letters(url))} rejected messages")
        if not args.once:
            print("\npipeline running; publish more ip.seen events or press Ctrl-C to stop")
            while all(p.poll() is None for p in processes.values()):
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                print(f"{name} did not stop within 10 s", file=sys.stderr)
        vhost.delete()
        print(f"==> services stopped, vhost {DEMO_VHOST} removed")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    raise SystemExit(main())
