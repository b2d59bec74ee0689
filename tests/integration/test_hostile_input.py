"""A dozen kinds of malformed messages, on every routing key the services consume: each lands in
geo.dead_letter with its reason, nothing crashes, and the messages around them still work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile_bodies import HOSTILE_ELSEWHERE, HOSTILE_IP_SEEN
from tests.integration.support import (
    ServiceProcess,
    async_poll,
    drain_queue,
    publish,
    read_rows,
    service_env,
    wait_for_topology,
)

pytestmark = pytest.mark.integration


async def test_every_kind_of_hostile_message_is_dead_lettered(
    amqp_url: str, tmp_path: Path
) -> None:
    db_path = tmp_path / "geo.sqlite3"
    processes = {
        name: ServiceProcess(
            name,
            service_env(amqp_url, db_path, GEO_MAX_MESSAGE_BYTES="1048576"),
            tmp_path / f"{name}.log",
        ).start()
        for name in ("persistence", "resolver", "timer")
    }
    try:
        await wait_for_topology(amqp_url)
        await async_poll(
            lambda: any(
                e.get("event") == "resolver_ready" for e in processes["resolver"].log_events()
            ),
            deadline_s=15,
            what="resolver ready (its flush queue bound)",
        )
        bodies: list[bytes] = [b'{"ip": "8.8.8.8"}']
        for body in HOSTILE_IP_SEEN.values():
            bodies += [body, b'{"ip": "1.1.1.1"}']
        await publish(amqp_url, "ip.seen", bodies)
        for key, body in HOSTILE_ELSEWHERE.values():
            await publish(amqp_url, key, [body])
        await publish(amqp_url, "ip.seen", [b'{"ips": ["9.9.9.9", "2001:4860:4860::8888"]}'])

        expected = len(HOSTILE_IP_SEEN) + len(HOSTILE_ELSEWHERE)
        collected: list[tuple[bytes, dict[str, object]]] = []

        async def all_dead() -> bool:
            got = await drain_queue(amqp_url, "geo.dead_letter")
            collected.extend((m.body, dict(m.headers or {})) for m in got)
            return len(collected) >= expected

        await async_poll(all_dead, deadline_s=30, what=f"{expected} dead letters")
        assert sorted(body for body, _ in collected) == sorted(
            [*HOSTILE_IP_SEEN.values(), *(body for _, body in HOSTILE_ELSEWHERE.values())]
        )
        reasons = {body: str(headers["x-geo-reject-reason"]) for body, headers in collected}
        assert all(reasons.values()), "every dead letter carries its reason"
        assert (
            "more than the 1048576 allowed" in reasons[HOSTILE_IP_SEEN["larger than the maximum"]]
        )
        assert "at most 1000" in reasons[HOSTILE_IP_SEEN["a 50,000-entry list"]]
        assert len(reasons[HOSTILE_IP_SEEN["a 100 kB string"]]) < 600  # not echoed back whole
        keys = {str(h["x-geo-original-routing-key"]) for _, h in collected}
        assert keys == {"ip.seen", "geo.upsert", "geo.retry", "geo.flush", "geo.re_resolve"}

        await async_poll(
            lambda: (
                {"8.8.8.8", "1.1.1.1", "9.9.9.9", "2001:4860:4860::8888"} <= set(read_rows(db_path))
            ),
            deadline_s=15,
            what="the valid messages around the hostile ones",
        )
        assert set(read_rows(db_path)) == {"8.8.8.8", "1.1.1.1", "9.9.9.9", "2001:4860:4860::8888"}
        assert all(p.running for p in processes.values()), "every service still runs"
    finally:
        codes = {name: p.stop() for name, p in processes.items()}
    assert codes == {"persistence": 0, "resolver": 0, "timer": 0}
