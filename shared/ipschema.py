"""The JSON Schema spelling of "an address ``normalize_ip`` accepts", for published schemas.

Component developers validate ``ip.seen`` against ``asyncapi.yaml`` with their own tools, so the
schema must refuse what the resolver refuses. ``format: ipv4`` is an annotation many validators
ignore; a ``pattern`` is enforced by every one. This is RFC 3986's ``IPv4address`` (no leading
zeros) and ``IPv6address`` (no zone index), the grammar Python's ``ipaddress`` parses; a unit test
holds the two together on generated addresses.
"""

from __future__ import annotations

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{IPV4})"
IPV6 = "|".join(
    [
        rf"(?:{_H16}:){{6}}{_LS32}",
        rf"::(?:{_H16}:){{5}}{_LS32}",
        rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    ]
)
# Anchored for ECMA-262 and Python alike: Python's `$` also matches before a final newline, which
# the negative look-ahead refuses.
IP_PATTERN = rf"^(?![\s\S]*\n)(?:{IPV4}|{IPV6})$"

IP_JSON_SCHEMA: dict[str, object] = {
    "type": "string",
    "pattern": IP_PATTERN,
    "maxLength": 45,
    "description": "An IPv4 (dotted quad, no leading zeros) or IPv6 address (no zone index).",
}
