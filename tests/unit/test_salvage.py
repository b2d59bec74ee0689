"""Splitting a bulk ip.seen with a few bad addresses: the good ones kept in order, the bad ones
dead-lettered with their positions; a message wrong as a whole is not split."""

from __future__ import annotations

import json

import pytest

from shared.decode import decode
from shared.errors import Rejected
from shared.messages import IpSeen
from shared.salvage import POSITIONS_FIELD, salvage_ip_seen


def test_the_valid_addresses_go_on_and_the_invalid_ones_keep_their_positions() -> None:
    ips = [f"8.8.{i // 256}.{i % 256}" for i in range(1000)]
    ips[3], ips[997] = "8.8.8.0008", "nope"
    body = json.dumps({"ips": ips, "source": "import", "jail": "sshd"}).encode()
    with pytest.raises(Rejected):
        decode(IpSeen, body, 1 << 20)  # the whole message fails the model
    part = salvage_ip_seen(body)
    assert part is not None
    assert part.kept.addresses == [ip for i, ip in enumerate(ips) if i not in (3, 997)]
    assert part.invalid == 2
    assert json.loads(part.rejected_body) == {
        "source": "import",
        "jail": "sshd",
        "ips": ["8.8.8.0008", "nope"],
        POSITIONS_FIELD: [3, 997],
    }
    assert part.reason == (
        "2 of 1000 addresses invalid, the other 998 kept: "
        "ips.3: Value error, not an IPv4 or IPv6 address: '8.8.8.0008'; "
        "ips.997: Value error, not an IPv4 or IPv6 address: 'nope'"
    )
    # The rejected part is itself an ip.seen body: fixed by hand, it can be published again.
    fixed = json.loads(part.rejected_body)
    fixed["ips"] = ["8.8.8.8", "9.9.9.9"]
    assert decode(IpSeen, json.dumps(fixed).encode(), 1 << 20).addresses == ["8.8.8.8", "9.9.9.9"]


def test_kept_addresses_are_normalized_and_non_strings_are_invalid() -> None:
    part = salvage_ip_seen(b'{"ips": ["::ffff:1.2.3.4", 7, null, "2001:DB8::1"]}')
    assert part is not None
    assert part.kept.addresses == ["1.2.3.4", "2001:db8::1"]
    assert json.loads(part.rejected_body)["ips"] == [7, None]
    assert "ips.1: Input should be a valid string; ips.2: Input should be" in part.reason


@pytest.mark.parametrize(
    "body",
    [
        b'{"ips": ["nope", "x"]}',  # nothing valid: dead-lettered whole, as before
        b'{"ips": ["1.1.1.1"]}',  # nothing invalid: not a rejected message
        b'{"ip": "1.1.1.1", "ips": ["1.1.1.1", "x"]}',  # both fields: wrong as a whole
        b'{"ip": "x"}',
        b'{"ips": "1.1.1.1"}',
        b'{"ips": []}',
        json.dumps({"ips": ["1.1.1.1"] * 1001 + ["x"]}).encode(),  # too many
        b'{"ips": ["1.1.1.1", "x"], "ips": ["2.2.2.2"]}',  # duplicate keys
        b"[1, 2]",
        b"not json",
        b'{"ips": ["1.1.1.1", "\xff"]}',
    ],
)
def test_a_message_wrong_as_a_whole_is_not_split(body: bytes) -> None:
    assert salvage_ip_seen(body) is None


def test_a_long_reason_is_cut() -> None:
    ips = ["1.1.1.1"] + [f"bad-{i}" for i in range(200)]
    part = salvage_ip_seen(json.dumps({"ips": ips}).encode())
    assert part is not None
    assert len(part.reason) == 500
    assert part.reason.endswith("...")
    assert len(json.loads(part.rejected_body)[POSITIONS_FIELD]) == 200
