"""The one generator of addresses for tests and the benchmark: distinct, globally routable IPs.

Deterministic (a seed picks the sequence) so runs are repeatable, and spread over the whole
address space so the embedded provider sees the usual mix of countries, not one block. Only first
octets whose every address is global are used, which keeps generation cheap and the resolver on
its lookup path (no ``not_global`` shortcuts). ``known=True`` keeps only addresses the embedded
data has a country for; ``ipv6_every=n`` makes every n-th address an IPv6 one (Google's
2001:4860::/32).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

import iptocc

from shared.ipnorm import is_routable

# First octets holding non-global space somewhere (0/8, 10/8, 100.64/10, 127/8, 169.254/16,
# 172.16/12, 192.168/16 and the 192.0.x test nets, 198.18/15, 203.0.113/24, 224/3).
_MIXED_OCTETS = frozenset({0, 10, 100, 127, 169, 172, 192, 198, 203})
_STEP = 2_654_435_761  # odd, so i -> base + i * step (mod 2**32) never repeats an address
_STEP_64 = 0x9E37_79B9_7F4A_7C15  # odd: the same for the 64 host bits of an IPv6 address
_CHECK_EVERY = 997
_GOOGLE_V6 = 0x2001_4860 << 96


def iter_public_ips(
    count: int, seed: int = 0, *, known: bool = False, ipv6_every: int = 0
) -> Iterator[str]:
    """``count`` distinct routable addresses (IPv4 unless ``ipv6_every``)."""
    base = (seed * 7_919_113) & 0xFFFFFFFF
    base_64 = (seed * 0xD6E8_FEB8_6659_FD93) & 0xFFFF_FFFF_FFFF_FFFF
    made = i = j = 0
    while made < count:
        if ipv6_every and made % ipv6_every == 0:
            j += 1
            host = (base_64 + j * _STEP_64) & 0xFFFF_FFFF_FFFF_FFFF
            ip = str(ipaddress.IPv6Address(_GOOGLE_V6 | host))
        else:
            n = (base + i * _STEP) & 0xFFFFFFFF
            i += 1
            first = n >> 24
            if first >= 224 or first in _MIXED_OCTETS:
                continue
            ip = f"{first}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        if known:
            if not (is_routable(ip) and iptocc.country_code(ip)):
                continue
        elif made % _CHECK_EVERY == 0 and not is_routable(ip):  # guard the octet table
            raise AssertionError(f"generated a non-routable address: {ip}")
        made += 1
        yield ip


def public_ips(count: int, seed: int = 0, *, known: bool = False, ipv6_every: int = 0) -> list[str]:
    return list(iter_public_ips(count, seed, known=known, ipv6_every=ipv6_every))


def non_global_ips(count: int, seed: int = 11) -> list[str]:
    """Up to ``count`` private, loopback, shared, multicast and unique-local addresses."""
    rng = random.Random(seed)
    makers = [
        lambda: f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"172.{rng.randrange(16, 32)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"127.0.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"100.64.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"224.0.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        lambda: f"fd00::{rng.randrange(1, 0xFFFF):x}",
    ]
    return list(dict.fromkeys(rng.choice(makers)() for _ in range(count)))


def known_public_ips(count: int, seed: int = 7) -> list[str]:
    """Addresses the embedded data knows a country for, every 50th an IPv6 one: what a provider
    stand-in answers (``public_ips`` with ``known=True, ipv6_every=50``)."""
    return public_ips(count, seed, known=True, ipv6_every=50)
