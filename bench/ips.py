"""Distinct, globally routable IPv4 addresses for the benchmark's messages.

Deterministic (a salt picks the sequence) so runs are repeatable, and spread over the whole
address space so the embedded provider sees the usual mix of countries, not one block. Only first
octets whose every address is global are used, which keeps generation cheap and the resolver on
its lookup path (no ``not_global`` shortcuts).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from shared.ipnorm import is_routable

# First octets holding non-global space somewhere (0/8, 10/8, 100.64/10, 127/8, 169.254/16,
# 172.16/12, 192.168/16 and the 192.0.x test nets, 198.18/15, 203.0.113/24, 224/3).
_MIXED_OCTETS = frozenset({0, 10, 100, 127, 169, 172, 192, 198, 203})
_STEP = 2_654_435_761  # odd, so i -> base + i * step (mod 2**32) never repeats an address
_CHECK_EVERY = 997


def iter_public_ipv4(count: int, salt: int = 0) -> Iterator[str]:
    base = (salt * 7_919_113) & 0xFFFFFFFF
    made = 0
    i = 0
    while made < count:
        n = (base + i * _STEP) & 0xFFFFFFFF
        i += 1
        first = n >> 24
        if first >= 224 or first in _MIXED_OCTETS:
            continue
        ip = f"{first}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        if made % _CHECK_EVERY == 0 and not is_routable(ip):  # guard the octet table
            raise AssertionError(f"generated a non-routable address: {ip}")
        made += 1
        yield ip


def public_ipv4(count: int, salt: int = 0) -> list[str]:
    return list(iter_public_ipv4(count, salt))


def single_bodies(ips: list[str]) -> list[bytes]:
    """One ``ip.seen`` per address, as a fail2ban action publishes them."""
    return [json.dumps({"ip": ip}).encode() for ip in ips]


def bulk_bodies(ips: list[str], per_message: int) -> list[bytes]:
    """``ip.seen`` messages of ``per_message`` addresses each, as an importer publishes them."""
    return [
        json.dumps({"ips": ips[i : i + per_message]}).encode()
        for i in range(0, len(ips), per_message)
    ]
