"""A dozen kinds of malformed messages, on every routing key the services consume: each lands in
geo.dead_letter with its reason, nothing crashes, and the messages around them still work."""

from __future__ import annotations

import json

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    drain_queue,
    publish,
    read_rows,
    wait_for_topology,
)
from tests.hostile_bodies import HOSTILE_ELSEWHERE, HOSTILE_IP_SEEN

pytestmark = pytest.mark.integration


async def test_every_kind_of_hostile_message_is_dead_lettered(
    amqp_url: str, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    processes = {
        name: service_group.start(name, GEO_MAX_MESSAGE_BYTES="1048576")
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
        routes = {"ip.seen", "geo.upsert", "geo.retry", "geo.flush", "geo.re_resolve"}
        assert keys == {*routes, "geo.lookup", "geo.known"}

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


async def test_one_typo_in_a_bulk_message_loses_no_other_address(
    amqp_url: str, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    processes = {name: service_group.start(name) for name in ("persistence", "resolver", "timer")}
    try:
        await wait_for_topology(amqp_url)
        ips = [f"203.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
        good = {ip for i, ip in enumerate(ips) if i not in (10, 600)}
        ips[10], ips[600] = "203.0.0.256", "2001:db8::g"
        await publish(amqp_url, "ip.seen", [{"ips": ips, "source": "import"}])

        await async_poll(
            lambda: good <= set(read_rows(db_path)), deadline_s=30, what="the 998 valid addresses"
        )
        letters: list[tuple[bytes, dict[str, object]]] = []

        async def dead_lettered() -> bool:
            got = await drain_queue(amqp_url, "geo.dead_letter")
            letters.extend((m.body, dict(m.headers or {})) for m in got)
            return bool(letters)

        await async_poll(dead_lettered, deadline_s=15, what="the invalid part dead-lettered")
        ((body, headers),) = letters
        assert json.loads(body) == {
            "source": "import",
            "ips": ["203.0.0.256", "2001:db8::g"],
            "original_indexes": [10, 600],
        }
        reason = str(headers["x-geo-reject-reason"])
        assert reason.startswith("2 of 1000 addresses invalid, the other 998 kept: ips.10: ")
        assert "ips.600: " in reason
        assert set(read_rows(db_path)) == good
    finally:
        codes = {name: p.stop() for name, p in processes.items()}
    assert codes == {"persistence": 0, "resolver": 0, "timer": 0}
