"""Where a dead letter came from and whether a replay may send it back: only the broker's newest
x-death entry or our services' own headers count, never a header a publisher could forge."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from shared.deadletters import dead_letter_from, dead_letter_headers, matches

FORGED = {
    "x-geo-original-routing-key": "geo.upsert",
    "x-geo-original-queue": "geo.persistence.upsert",
    "x-geo-rejected-by": "persistence",
    "x-geo-reject-reason": "database is locked",
}


def death(queue: str, reason: str = "expired", keys: list[str] | None = None) -> dict[str, object]:
    return {"count": 1, "reason": reason, "queue": queue, "routing-keys": keys or ["geo.upsert"]}


def test_the_brokers_newest_death_decides_and_forged_headers_are_ignored() -> None:
    headers = {
        **FORGED,
        "x-death": [death("geo.resolver.ip_seen"), death("geo.persistence.upsert")],
    }
    letter = dead_letter_from(b"{}", "ip.seen", headers)  # the key it was published with
    assert (letter.written_by, letter.replay_key, letter.original_queue) == (
        "broker",
        "ip.seen",  # the queue's route, not the entry's routing-keys
        "geo.resolver.ip_seen",
    )
    assert (letter.rejected_by, letter.refusal) == (None, None)
    assert letter.reason == "dead-lettered by the broker: expired"


@pytest.mark.parametrize(
    ("queue", "key", "refusal"),
    [
        ("geo.other", "x", "kept: from geo.other, not a queue of ours"),
        ("geo.persistence.re_resolve", "geo.re_resolve", "kept: geo.re_resolve is not replayed"),
        ("geo.resolver.flush.web-1.17", "geo.flush", "kept: geo.flush is not replayed"),
        # A CC copy of a publisher's ip.seen that expired in the upsert queue.
        ("geo.persistence.upsert", "ip.seen", "kept: it reached geo.persistence.upsert as ip.seen"),
    ],
)
def test_broker_dead_letters_from_elsewhere_or_of_commands_are_kept(
    queue: str, key: str, refusal: str
) -> None:
    letter = dead_letter_from(b"{}", key, {"x-death": [death(queue)]})
    assert letter.refusal is not None
    assert letter.refusal.startswith(refusal)


def test_a_services_dead_letter_goes_back_to_what_its_queue_is_for() -> None:
    letter = dead_letter_from(
        b"{}", "geo.upsert", {**FORGED, "x-geo-original-routing-key": "geo.upsert"}
    )
    assert (letter.written_by, letter.replay_key, letter.refusal) == ("service", "geo.upsert", None)
    assert letter.rejected_by == "persistence"


def test_a_services_dead_letter_that_arrived_by_cc_or_under_another_key_is_kept() -> None:
    cc = dead_letter_from(b"{}", "geo.upsert", {**FORGED, "x-geo-original-routing-key": "ip.seen"})
    assert cc.refusal is not None
    assert "CC/BCC" in cc.refusal
    moved = dead_letter_from(
        b"{}", "ip.seen", {**FORGED, "x-geo-original-routing-key": "geo.upsert"}
    )
    assert (
        moved.refusal
        == "kept: dead-lettered as ip.seen, but geo.persistence.upsert is for geo.upsert"
    )


def test_a_dead_letter_nobody_recorded_is_kept() -> None:
    letter = dead_letter_from(b"{}", "ip.seen", {"x-geo-reject-reason": "trust me"})
    assert (letter.written_by, letter.replay_key, letter.reason) == ("unknown", None, "unknown")
    assert letter.refusal is not None


def test_a_services_copy_drops_what_only_the_broker_or_we_may_write() -> None:
    incoming = {
        **FORGED,
        "x-death": [death("geo.persistence.upsert")],
        "x-first-death-queue": "geo.persistence.upsert",
        "CC": ["geo.upsert"],
        "bcc": ["geo.re_resolve"],
        "traceparent": "00-abc-01",
    }
    headers = dead_letter_headers(
        incoming,
        reason="not bound",
        service="resolver",
        queue="geo.resolver.ip_seen",
        delivered_as="ip.seen",
    )
    assert headers == {
        "traceparent": "00-abc-01",
        "x-geo-reject-reason": "not bound",
        "x-geo-rejected-by": "resolver",
        "x-geo-original-queue": "geo.resolver.ip_seen",
        "x-geo-original-routing-key": "ip.seen",
    }


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OURS = {
    "x-geo-rejected-by": "resolver",
    "x-geo-original-queue": "geo.resolver.ip_seen",
    "x-geo-original-routing-key": "ip.seen",
    "x-geo-reject-reason": "ips.3: Value error, not an IPv4 or IPv6 address: 'x'",
}


def test_a_dead_letters_age_comes_from_the_broker_or_the_service_only() -> None:
    two_days = NOW - timedelta(days=2)
    # A publisher's own timestamp property is not the broker's record of the death.
    broker = dead_letter_from(
        b"{}", "ip.seen", {"x-death": [{**death("geo.resolver.ip_seen"), "time": two_days}]}, NOW
    )
    assert broker.dead_at == two_days.replace(tzinfo=UTC)
    service = dead_letter_from(b"{}", "ip.seen", OURS, two_days)
    assert service.dead_at == two_days
    naive = dead_letter_from(b"{}", "ip.seen", OURS, datetime(2026, 11, 29, 12, 0))
    assert naive.dead_at == two_days  # AMQP timestamps carry no zone: UTC
    assert dead_letter_from(b"{}", "ip.seen", OURS).dead_at is None


def test_purge_selects_by_every_criterion_and_never_by_an_unknown_age() -> None:
    old = dead_letter_from(b"{}", "ip.seen", OURS, NOW - timedelta(days=3))
    new = dead_letter_from(b"{}", "ip.seen", OURS, NOW - timedelta(minutes=5))
    ageless = dead_letter_from(b"{}", "ip.seen", OURS)
    day = timedelta(days=1)
    ipv4 = re.compile("not an ipv4", re.IGNORECASE)
    locked = re.compile("locked", re.IGNORECASE)
    assert [matches(x, now=NOW, older_than=day) for x in (old, new, ageless)] == [
        True,
        False,
        False,
    ]
    assert matches(old, now=NOW, reason=ipv4)
    assert not matches(old, now=NOW, reason=locked)
    assert matches(old, now=NOW, older_than=day, reason=ipv4)
    assert not matches(new, now=NOW, older_than=day, reason=ipv4)
    assert matches(ageless, now=NOW)  # no criterion: everything
