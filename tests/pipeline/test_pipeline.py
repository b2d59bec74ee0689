"""The pipeline through the services' real bootstraps, in-process: on the in-memory broker in
the fast lane, and the same test bodies on a real RabbitMQ under the integration marker."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, cast

from bangui_geo.testing import async_poll
from bangui_geo.testing.expected import expected_row
from services.persistence.ports import GeoRepository
from services.persistence.stores import open_repository
from shared.ipnorm import is_routable, normalize_ip
from shared.messages import GeoLookupReply, GeoRow, Resolution, iso_utc_from_epoch
from shared.settings import Settings
from tests.pipeline.harness import DeadLetter, Pipeline


def summary(rows: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {ip: (r[0], r[1], r[5]) for ip, r in rows.items()}


def public_v4(n: int, seed: int = 0x9E3779B9) -> list[str]:
    """Deterministic public IPv4 addresses spread over the address space."""
    out: list[str] = []
    x = seed
    while len(out) < n:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        ip = ".".join(str((x >> shift) & 255) for shift in (24, 16, 8, 0))
        if is_routable(ip):
            out.append(ip)
    return out


async def collect_dead_letters(pipeline: Pipeline, count: int) -> list[DeadLetter]:
    collected: list[DeadLetter] = []

    async def enough() -> bool:
        pipeline.check_running()
        collected.extend(await pipeline.broker.dead_letters())
        return len(collected) >= count

    await async_poll(enough, deadline_s=20, what=f"{count} dead letters")
    return collected


async def collect_dead_letters_now(pipeline: Pipeline) -> list[DeadLetter]:
    pipeline.check_running()
    return await pipeline.broker.dead_letters()


async def test_a_mixed_burst_becomes_exact_rows_and_malformed_bodies_are_dead_lettered(
    pipeline: Pipeline,
) -> None:
    pipeline.start("timer")
    pipeline.start("persistence")
    await pipeline.broker.ready()
    public = public_v4(400)
    others = ["2001:4860:4860::8888", "::ffff:8.8.4.4", "10.1.2.3", "::1", "192.88.99.1"]
    bodies: list[Any] = [{"ip": ip, "source": "test", "jail": "sshd"} for ip in public[:300]]
    bodies += [{"ips": public[i : i + 50]} for i in range(300, 400, 50)]
    bodies += [{"ip": ip} for ip in others]
    bodies += [{"ip": ip} for ip in public[:100]]  # duplicates
    malformed = [
        b"not json at all",
        b'{"ip": 12345}',
        b'{"ip": "300.1.2.3"}',
        b'{"ips": []}',
        b"[1, 2, 3]",
        b'{"ips": [' + b",".join(b'"1.1.1.1"' for _ in range(1001)) + b"]}",
        b"\xff\xfe\x00garbage",
    ]
    step = len(bodies) // len(malformed)
    for i, bad in enumerate(malformed):
        bodies.insert((i + 1) * step, bad)
    await pipeline.broker.send("ip.seen", bodies)
    pipeline.start("resolver")

    expected = {normalize_ip(ip): expected_row(normalize_ip(ip)) for ip in public + others}

    async def complete() -> bool:
        pipeline.check_running()
        return summary(pipeline.rows()) == expected

    await async_poll(complete, deadline_s=30, what="geo_cache to hold exactly the expected rows")
    rows = pipeline.rows()
    assert rows["2001:4860:4860::8888"][0] == "US"
    assert "8.8.4.4" in rows
    assert all(r[4].endswith("Z") and r[4][10] == "T" for r in rows.values())

    dead = await collect_dead_letters(pipeline, len(malformed))
    assert sorted(d.body for d in dead) == sorted(malformed)
    reasons = {d.body: d.reason for d in dead}
    assert "not valid JSON" in reasons[b"not json at all"]
    assert "300.1.2.3" in reasons[b'{"ip": "300.1.2.3"}']
    assert "1000" in reasons[malformed[5]]
    assert all(d.headers["x-geo-original-routing-key"] == "ip.seen" for d in dead)
    assert all(d.headers["x-geo-rejected-by"] == "resolver" for d in dead)
    await pipeline.stop_all()  # each service stops cleanly: no exception


class FlakyStore:
    """The real SQLite repository, except that batches holding ``ip`` fail ``times`` times."""

    def __init__(self, failures: dict[str, int]) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = dict.fromkeys(failures, 0)

    async def open(self, settings: Settings) -> GeoRepository:
        real = await open_repository(settings)
        store = self

        class Flaky:
            """Everything but ``upsert_many`` is the real store's."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            async def upsert_many(self, rows: Sequence[GeoRow], *args: Any, **kw: Any) -> int:
                for row in rows:
                    if row.ip in store.failures:
                        store.attempts[row.ip] += 1
                        if store.attempts[row.ip] <= store.failures[row.ip]:
                            raise RuntimeError(f"disk trouble at {row.ip}")
                return await real.upsert_many(rows, *args, **kw)

        return cast(GeoRepository, Flaky())


def upsert(batch_id: str, ip: str) -> dict[str, Any]:
    row = [ip, Resolution.RESOLVED.value, iso_utc_from_epoch(time.time()), "US", "United States"]
    return {"batch_id": batch_id, "rows": [row]}


async def test_a_handler_failing_once_is_requeued_and_twice_is_dead_lettered(
    pipeline: Pipeline,
) -> None:
    store = FlakyStore({"8.8.8.8": 1, "9.9.9.9": 5})
    pipeline.start("persistence", store=store.open)
    await pipeline.broker.ready()
    await pipeline.broker.send(
        "geo.upsert", [upsert("once", "8.8.8.8"), upsert("twice", "9.9.9.9")]
    )

    await async_poll(lambda: "8.8.8.8" in pipeline.rows(), deadline_s=15, what="the retried row")
    (dead,) = await collect_dead_letters(pipeline, 1)
    assert json.loads(dead.body)["batch_id"] == "twice"
    assert dead.reason == "handler failed on redelivery: RuntimeError('disk trouble at 9.9.9.9')"
    assert dead.headers["x-geo-original-queue"] == "geo.persistence.upsert"
    assert store.attempts == {"8.8.8.8": 2, "9.9.9.9": 2}  # requeued once, then handled
    assert "9.9.9.9" not in pipeline.rows()
    await pipeline.stop_all()


async def test_a_cc_or_bcc_copy_is_refused_and_the_real_message_handled(
    pipeline: Pipeline,
) -> None:
    pipeline.start("persistence")
    pipeline.start("resolver")
    pipeline.start("timer")
    await pipeline.broker.ready()
    headers = {"CC": ["geo.upsert"], "BCC": ["geo.re_resolve"]}
    await pipeline.broker.send("ip.seen", [{"ip": "8.8.8.8"}], headers=headers)

    await async_poll(lambda: "8.8.8.8" in pipeline.rows(), deadline_s=15, what="the real ip.seen")
    dead = await collect_dead_letters(pipeline, 2)
    assert sorted(d.reason for d in dead) == [
        "routing key 'ip.seen' is not bound to geo.persistence.re_resolve",
        "routing key 'ip.seen' is not bound to geo.persistence.upsert",
    ]
    for letter in dead:
        assert not {"CC", "BCC", "x-death"} & set(letter.headers), letter.headers
        assert letter.headers["x-geo-original-routing-key"] == "ip.seen"
    assert pipeline.rows()["8.8.8.8"][0] == "US"
    await pipeline.stop_all()


async def test_a_half_bad_ip_seen_keeps_its_valid_addresses(pipeline: Pipeline) -> None:
    pipeline.start("persistence")
    pipeline.start("resolver")
    pipeline.start("timer")
    await pipeline.broker.ready()
    await pipeline.broker.send("ip.seen", [b'{"ips": ["1.1.1.1", "nope", "8.8.4.4"]}'])

    await async_poll(
        lambda: {"1.1.1.1", "8.8.4.4"} <= set(pipeline.rows()), deadline_s=15, what="both rows"
    )
    (dead,) = await collect_dead_letters(pipeline, 1)
    assert dead.body == b'{"ips": ["nope"], "original_indexes": [1]}'
    assert "nope" in dead.reason
    assert set(pipeline.rows()) == {"1.1.1.1", "8.8.4.4"}
    await pipeline.stop_all()


async def test_re_resolve_round_trip(pipeline: Pipeline) -> None:
    pipeline.start("persistence")
    await pipeline.broker.ready()

    def schema_ready() -> bool:
        pipeline.check_running()
        if not pipeline.db_path.exists():
            return False
        with sqlite3.connect(pipeline.db_path) as db:
            return bool(db.execute("SELECT 1 FROM sqlite_master WHERE name='geo_cache'").fetchone())

    await async_poll(schema_ready, deadline_s=15, what="geo_cache created")
    with sqlite3.connect(pipeline.db_path) as db:
        for ip, resolution in [
            ("9.9.9.9", "failed"),
            ("8.8.8.8", "failed"),
            ("4.4.4.4", "rejected"),
        ]:
            db.execute(
                "INSERT INTO geo_cache (ip, cached_at, resolution, provider)"
                " VALUES (?, '2020-01-01T00:00:00.000000Z', ?, 'ip-api')",
                (ip, resolution),
            )
    pipeline.start("resolver")
    pipeline.start("timer", re_resolve_interval=0.5)

    async def retried() -> bool:
        pipeline.check_running()
        rows = pipeline.rows()
        return all(rows[ip][0] for ip in ("9.9.9.9", "8.8.8.8"))

    await async_poll(retried, deadline_s=20, what="failed rows resolved by re-resolve")
    rows = pipeline.rows()
    assert rows["8.8.8.8"][:2] == ("US", "United States")
    assert rows["9.9.9.9"][5] == "resolved"
    assert rows["4.4.4.4"][0] is None  # a rejected row is never retried
    assert rows["4.4.4.4"][5] == "rejected"
    await pipeline.stop_all()


async def test_geo_lookup_is_answered(pipeline: Pipeline) -> None:
    pipeline.start("persistence")
    pipeline.start("resolver")
    await pipeline.broker.ready()
    body = json.dumps({"ips": ["8.8.8.8", "10.0.0.1", "::ffff:1.1.1.1"], "timeout_ms": 5000})

    async def answered() -> bytes | None:
        pipeline.check_running()
        return await pipeline.broker.request("geo.lookup", body.encode(), wait=5)

    reply = GeoLookupReply.model_validate_json(
        await async_poll(answered, deadline_s=20, what="a geo.lookup reply")
    )
    assert [(r.ip, r.resolution, r.country_code) for r in reply.rows] == [
        ("8.8.8.8", "resolved", "US"),
        ("10.0.0.1", "not_global", None),
        ("1.1.1.1", *expected_row("1.1.1.1")[2::-2]),
    ]
    refused = await pipeline.broker.request("geo.lookup", b'{"ips": ["nope"]}', wait=5)
    assert refused is not None
    assert "nope" in json.loads(refused)["error"]
    await pipeline.stop_all()


async def test_a_redelivered_request_is_acked_unanswered(pipeline: Pipeline) -> None:
    # A request whose first answer was cut off: its asker has stopped waiting, and an answer to
    # an asker on a broker node that went down would make RabbitMQ close the answering
    # connection, again at every reconnect.
    pipeline.start("persistence")
    await pipeline.broker.ready()
    body = json.dumps({"ips": ["8.8.8.8"], "timeout_ms": 2000}).encode()
    asking = asyncio.ensure_future(pipeline.broker.request("geo.lookup", body, wait=3))
    await async_poll(
        lambda: pipeline.broker.bounce("geo.resolver.lookup"), deadline_s=5, what="the request"
    )
    pipeline.start("resolver")
    assert await asking is None
    assert await collect_dead_letters_now(pipeline) == []
    fresh = await pipeline.broker.request("geo.lookup", body, wait=5)
    assert fresh is not None  # the resolver answers the next one
    assert [r.ip for r in GeoLookupReply.model_validate_json(fresh).rows] == ["8.8.8.8"]
    await pipeline.stop_all()
