"""Hostile bodies at the edge: every body either becomes a valid model or a short ``Rejected``
reason fit for the dead-letter header, never another exception and never the whole input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.decode import decode, repeated_key
from shared.errors import Rejected
from shared.ipnorm import normalize_ip
from shared.messages import MAX_IPS_PER_MESSAGE, GeoUpsertBatch, IpSeen

LIMIT = 1_048_576


def reason(body: bytes, max_bytes: int = LIMIT) -> str:
    with pytest.raises(Rejected) as info:
        decode(IpSeen, body, max_bytes)
    return info.value.reason


def test_valid_body_decodes() -> None:
    assert decode(IpSeen, b'{"ip": "8.8.8.8", "jail": "sshd"}', LIMIT).addresses == ["8.8.8.8"]


@pytest.mark.parametrize("body", [b"", b"not json", b'{"ip": "8.8.8.8"', b"{'ip': '8.8.8.8'}"])
def test_not_json_is_rejected(body: bytes) -> None:
    assert reason(body).startswith("not valid JSON: ")


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"ip": "8.8.\xff8.8"}'])
def test_invalid_utf8_is_rejected_as_not_json(body: bytes) -> None:
    assert reason(body).startswith("not valid JSON: ")


def test_oversize_body_is_rejected_before_parsing() -> None:
    body = json.dumps({"ip": "8.8.8.8", "pad": "x" * 2000}).encode()
    assert decode(IpSeen, body, len(body)).ip == "8.8.8.8"  # exactly at the limit is fine
    text = reason(body, max_bytes=len(body) - 1)
    assert text == f"body is {len(body)} bytes, more than the {len(body) - 1} allowed"


def test_oversize_check_does_not_need_valid_json() -> None:
    assert reason(b"\x00" * 2048, max_bytes=1024).startswith("body is 2048 bytes")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"ip": 5}, "ip: Input should be a valid string"),
        ({"ips": []}, "ips: List should have at least 1 item"),
        ({"ips": ["8.8.8.8", "nope"]}, "ips.1: Value error, not an IPv4 or IPv6 address: 'nope'"),
        ({}, "body: Value error, exactly one of 'ip' or 'ips' is required"),
        ([1, 2], "body: Input should be an object"),
    ],
)
def test_schema_errors_name_the_field(body: Any, expected: str) -> None:
    assert reason(json.dumps(body).encode()).startswith(expected)


def test_schema_errors_do_not_echo_huge_input() -> None:
    huge = "9" * 10_000
    text = reason(json.dumps({"ips": [huge] * 50}).encode())
    assert len(text) <= 500
    assert huge not in text
    assert "ips.0: " in text


def test_many_errors_are_summarized() -> None:
    text = reason(json.dumps({"ips": [f"bad{i}" for i in range(8)]}).encode())
    assert text.count("not an IPv4 or IPv6 address") == 5
    assert text.endswith("... and 3 more")


def test_another_model_names_nested_fields() -> None:
    body = {"batch_id": "b", "rows": [{"ip": "8.8.8.8", "resolution": "resolved"}]}
    with pytest.raises(
        Rejected, match=r"rows\.0\.cached_at: (Field required|Missing required argument)"
    ):
        decode(GeoUpsertBatch, json.dumps(body).encode(), LIMIT)


def assert_valid(event: IpSeen) -> None:
    assert (event.ip is None) != (event.ips is None)
    assert 1 <= len(event.addresses) <= MAX_IPS_PER_MESSAGE
    assert all(normalize_ip(ip) == ip for ip in event.addresses)


def decode_or_reject(body: bytes) -> None:
    try:
        event = decode(IpSeen, body, 4096)
    except Rejected as exc:
        reason = exc.reason
    else:
        assert_valid(event)
        return
    assert reason
    assert len(reason) <= 500


ip_texts = st.ip_addresses().map(str) | st.ip_addresses().map(lambda a: str(a).upper())
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | ip_texts
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["ip", "ips", "jail"]) | st.text(max_size=5), children)
    ),
    max_leaves=12,
)
ip_seen_like = st.fixed_dictionaries(
    {},
    optional={
        "ip": json_values | ip_texts,
        "ips": st.lists(ip_texts | json_scalars, max_size=5) | json_values,
        "source": json_values,
    },
)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_are_rejected(body: bytes) -> None:
    decode_or_reject(body)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(json_values | ip_seen_like)
def test_arbitrary_json_decodes_or_is_rejected(value: Any) -> None:
    decode_or_reject(json.dumps(value).encode())


@given(st.lists(ip_texts, min_size=1, max_size=20), st.booleans())
def test_valid_ip_seen_round_trips(addresses: list[str], single: bool) -> None:
    event = IpSeen(ip=addresses[0]) if single else IpSeen(ips=addresses)
    decoded = decode(IpSeen, event.model_dump_json().encode(), LIMIT)
    assert decoded == event
    assert decoded.addresses == [normalize_ip(a) for a in event.addresses]


def upsert_body(rows: str, extra: str = "") -> bytes:
    return ('{"batch_id": "b", "rows": ' + rows + extra + "}").encode()


ROW = '["8.8.8.8", "failed", "2026-11-22T12:01:26.519722Z"]'


@pytest.mark.parametrize(
    ("model", "body", "key"),
    [
        (IpSeen, b'{"ip": "11.0.0.9", "ip": "1.2.3.4"}', "ip"),
        (IpSeen, b'{"ip": "11.0.0.9", "ip" : "1.2.3.4"}', "ip"),
        (IpSeen, b'{"ip": "11.0.0.9", "\\u0069p": "1.2.3.4"}', "ip"),  # an escaped spelling
        (IpSeen, b'{"ips": ["1.1.1.1"], "jail": "a", "ips": ["2.2.2.2"]}', "ips"),
        (IpSeen, b'{"ip": "1.1.1.1", "meta": {"a": 1, "a": 2}}', "a"),  # nested: any repeat
        (GeoUpsertBatch, upsert_body(f"[{ROW}]", f', "rows": [{ROW}]'), "rows"),
        (GeoUpsertBatch, upsert_body(f"[{ROW}]", ', "batch_id": "c"'), "batch_id"),
        (
            GeoUpsertBatch,
            upsert_body(
                '[{"ip": "1.1.1.1", "ip": "2.2.2.2", "resolution": "failed",'
                ' "cached_at": "2026-11-22T12:01:26.519722Z"}]'
            ),
            "ip",
        ),
    ],
)
def test_a_repeated_key_is_rejected(model: type[Any], body: bytes, key: str) -> None:
    with pytest.raises(Rejected) as info:
        decode(model, body, LIMIT)
    assert info.value.reason == f"duplicate key {key!r} in one object"


@pytest.mark.parametrize(
    "body",
    [
        b'{"ip": "1.1.1.1", "source": "ip", "jail": "\\"ip\\": x"}',  # the name as a value
        b'{"ip": "1.1.1.1", "seen": {"ip": "2.2.2.2"}, "other": {"ip": "3.3.3.3"}}',
        b'{"ips": ["1.1.1.1"], "source": "caf\\u00e9"}',  # an escape in a value, not a key
    ],
)
def test_a_field_name_elsewhere_is_not_a_repeat(body: bytes) -> None:
    assert decode(IpSeen, body, LIMIT).addresses[0] == "1.1.1.1"


def test_the_resolvers_bodies_take_the_fast_path() -> None:
    rows = [
        [f"11.0.{i // 256}.{i % 256}", "resolved", "2026-11-22T12:01:26.519722Z", "CI"]
        for i in range(1000)
    ]
    for row in rows:
        row += ["C\u00f4te d'Ivoire", None, None, "embedded"]
    body = json.dumps({"batch_id": "x" * 32, "rows": rows}, separators=(",", ":")).encode()
    assert b"\\u00f4" in body  # escapes in values do not force the exact parse
    assert repeated_key(GeoUpsertBatch, body) is None
    assert len(decode(GeoUpsertBatch, body, LIMIT).rows) == 1000
