"""Malformed message bodies, shared by the tests that feed them to the services over the broker
(tests/integration/test_hostile_input.py) and the test that holds asyncapi.yaml's schemas to the
services' verdicts (tests/unit/test_asyncapi.py)."""

from __future__ import annotations

import json

HOSTILE_IP_SEEN: dict[str, bytes] = {
    "not JSON": b"{ip: 1.2.3.4",
    "empty body": b"",
    "JSON null": b"null",
    "a number": b"42",
    "wrong type for ip": b'{"ip": ["8.8.8.8"]}',
    "wrong types in ips": b'{"ips": [1, 2, 3]}',
    "invalid IP": b'{"ip": "256.256.256.256"}',
    "a 100 kB string": json.dumps({"ip": "A" * 100_000}).encode(),
    "a 50,000-entry list": json.dumps({"ips": ["8.8.8.8"] * 50_000}).encode(),
    "invalid UTF-8": b'{"ip": "\xff\xfe\xfd"}',
    "SQL in a string": b'{"ip": "1.1.1.1\'); DROP TABLE geo_cache; --"}',
    "nested object": b'{"ip": {"$ne": null}}',
    "larger than the maximum": b'{"ips": ["' + b"9" * 2_000_000 + b'"]}',
}
HOSTILE_ELSEWHERE: dict[str, tuple[str, bytes]] = {
    "upsert not JSON": ("geo.upsert", b"\x00\x01\x02"),
    "upsert SQL as ip": (
        "geo.upsert",
        b'{"batch_id": "x", "rows": [["1\'; DROP TABLE geo_cache; --", "resolved",'
        b' "2026-01-01T00:00:00.000000Z"]]}',
    ),
    "retry bad ip": ("geo.retry", b'{"tick_id": "t", "ips": ["nope"]}'),
    "flush wrong type": ("geo.flush", b'{"tick_id": 5, "issued_at": "yesterday"}'),
    "re_resolve not an object": ("geo.re_resolve", b'["re_resolve"]'),
    "lookup bad ip": ("geo.lookup", b'{"ips": ["1.1.1.1", "nope"]}'),
    "lookup no ips": ("geo.lookup", b'{"ips": []}'),
    "lookup one ip as a string": ("geo.lookup", b'{"ips": "1.1.1.1"}'),
    "lookup timeout too long": ("geo.lookup", b'{"ips": ["1.1.1.1"], "timeout_ms": 30001}'),
    "lookup timeout zero": ("geo.lookup", b'{"ips": ["1.1.1.1"], "timeout_ms": 0}'),
    "lookup timeout as text": ("geo.lookup", b'{"ips": ["1.1.1.1"], "timeout_ms": "2000"}'),
    "lookup timeout fraction": ("geo.lookup", b'{"ips": ["1.1.1.1"], "timeout_ms": 1.5}'),
    "lookup timeout true": ("geo.lookup", b'{"ips": ["1.1.1.1"], "timeout_ms": true}'),
    "known bad ip": ("geo.known", b'{"ips": ["300.1.1.1"]}'),
}

# Request bodies the resolver accepts, which a schema must accept too.
EDGE_LOOKUP: dict[str, bytes] = {
    "lookup timeout whole float": b'{"ips": ["1.1.1.1"], "timeout_ms": 2000.0}',
    "lookup mapped and uppercase": b'{"ips": ["::ffff:1.1.1.1", "2001:DB8::1"], "x": 1}',
    "lookup longest timeout": b'{"ips": ["1.1.1.1"], "timeout_ms": 30000}',
}


# Edge cases of ip.seen a component developer's validator must judge as the resolver does.
EDGE_IP_SEEN: dict[str, tuple[bytes, bool]] = {
    "one IPv4": (b'{"ip": "8.8.8.8"}', True),
    "a list with IPv6 and mapped IPv4": (b'{"ips": ["2001:db8::1", "::ffff:192.0.2.9"]}', True),
    "extra fields": (b'{"ip": "1.1.1.1", "source": "fail2ban", "jail": "sshd", "x": [1]}', True),
    "ip null beside ips": (b'{"ip": null, "ips": ["1.1.1.1"]}', True),
    "1000 addresses": (json.dumps({"ips": ["9.9.9.9"] * 1000}).encode(), True),
    "uppercase IPv6": (b'{"ip": "2001:DB8::A"}', True),
    "an empty object": (b"{}", False),
    "ip null": (b'{"ip": null}', False),
    "both ip and ips": (b'{"ip": "1.1.1.1", "ips": ["1.1.1.1"]}', False),
    "not an address": (b'{"ip": "nope"}', False),
    "leading zeros": (b'{"ip": "1.2.3.004"}', False),
    "a zone index": (b'{"ip": "fe80::1%eth0"}', False),
    "a trailing newline": (b'{"ip": "8.8.8.8\\n"}', False),
    "an empty list": (b'{"ips": []}', False),
    "1001 addresses": (json.dumps({"ips": ["9.9.9.9"] * 1001}).encode(), False),
    "a number as ip": (b'{"ip": 134744072}', False),
    "a list as the body": (b'["8.8.8.8"]', False),
}
