"""The publisher client's bodies, built without a broker: the contract's two shapes, the split
at 1000, the optional fields, and a bad address refused with its position."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.client import ip_seen_bodies
from shared.messages import IpSeen


def decoded(bodies: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(body) for body in bodies]


def test_one_ip_is_an_ip_body_normalized_with_its_fields() -> None:
    seen_at = datetime(2026, 11, 22, 13, 1, 26, 519722, tzinfo=timezone(timedelta(hours=1)))
    bodies = ip_seen_bodies("::ffff:203.0.113.7", jail="sshd", source="fail2ban", seen_at=seen_at)
    assert decoded(bodies) == [
        {
            "ip": "203.0.113.7",
            "jail": "sshd",
            "source": "fail2ban",
            "seen_at": "2026-11-22T12:01:26.519722Z",
        }
    ]
    assert IpSeen.model_validate_json(bodies[0]).addresses == ["203.0.113.7"]


def test_lists_are_split_at_1000_in_order() -> None:
    ips = [f"198.51.{n // 256}.{n % 256}" for n in range(2500)]
    bodies = decoded(ip_seen_bodies(ips, source="web"))
    assert [len(b["ips"]) for b in bodies] == [1000, 1000, 500]  # type: ignore[arg-type]
    assert [ip for b in bodies for ip in b["ips"]] == ips  # type: ignore[attr-defined]
    assert {b["source"] for b in bodies} == {"web"}
    assert all("jail" not in b for b in bodies)
    assert ip_seen_bodies([]) == []


def test_a_bad_ip_is_named_with_its_position_and_nothing_is_built() -> None:
    ips = ["1.1.1.1"] * 1500 + ["2001:db8::zz"]
    with pytest.raises(
        ValueError, match=r"^ips\[1500\]: not an IPv4 or IPv6 address: '2001:db8::zz'$"
    ):
        ip_seen_bodies(ips)
    with pytest.raises(ValueError, match=r"^ip: not an IPv4 or IPv6 address: 'fe80::1%eth0'$"):
        ip_seen_bodies("fe80::1%eth0")


def test_naive_seen_at_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ip_seen_bodies("1.1.1.1", seen_at=datetime(2026, 1, 1))
    assert (
        decoded(ip_seen_bodies("1.1.1.1", seen_at=datetime(2026, 1, 1, tzinfo=UTC)))[0]["seen_at"]
        == "2026-01-01T00:00:00Z"
    )


def test_the_public_import_is_the_client() -> None:
    """Other components import ``bangui_geo.client``; it is the same client, not a copy."""
    import bangui_geo.client
    import shared.client

    for name in bangui_geo.client.__all__:
        assert getattr(bangui_geo.client, name) is getattr(shared.client, name)
    assert {"GeoPublisher", "PublishFailed", "BrokerUnreachable"} <= set(bangui_geo.client.__all__)
