"""IP address normalization and the "is it worth a lookup" rule, pure and shared by all services.

One spelling per address keeps the cache, the dirty set and the ``geo_cache`` primary key in step:
compressed form, and IPv4-mapped IPv6 (``::ffff:1.2.3.4``) folded into plain IPv4.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket


def normalize_ip(value: str) -> str:
    """Return the canonical text of an IP address; raise ``ValueError`` naming the bad input."""
    if ":" not in value:  # fast path: dotted-quad IPv4 (inet_pton refuses leading zeros)
        try:
            socket.inet_pton(socket.AF_INET, value)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            pass
        else:
            return value
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    # A zone index ("fe80::1%eth0") means something only on the sender's host; kept, it would
    # give one address endless spellings: separate rows, retried forever, never resolved.
    if address is None or (isinstance(address, ipaddress.IPv6Address) and address.scope_id):
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise ValueError(f"not an IPv4 or IPv6 address: {shown!r}")
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return address.compressed


def is_routable(ip: str) -> bool:
    """Whether a provider can say anything about ``ip``: Python's ``is_global``, minus multicast
    (which ``is_global`` counts as global but no geolocation source covers), and for IPv6 only
    the global unicast space 2000::/3, the only one IANA allocates: the rest is reserved, among
    it the deprecated IPv4-compatible ``::a.b.c.d`` that ``is_global`` calls global, which no
    provider answers, so it would be retried forever."""
    if _V4_NOT_ROUTABLE is not None and ":" not in ip:
        try:
            number = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        except OSError:
            pass  # not dotted-quad IPv4: the slow path raises the usual ValueError
        else:
            starts, ends = _V4_NOT_ROUTABLE
            i = bisect.bisect_right(starts, number) - 1
            return not (i >= 0 and number <= ends[i])
    return _slow_is_routable(ip)


def _slow_is_routable(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.packed[0] & 0xE0 != 0x20:
        return False  # outside 2000::/3
    return address.is_global and not address.is_multicast


def _v4_table() -> tuple[list[int], list[int]] | None:
    """Merged IPv4 ranges that are not routable, from the stdlib's own lists, so the hot path is
    one bisect instead of ~6 us of ``is_global``. None (use the stdlib) if this Python's
    ``is_global`` is not what the table predicts at every range edge."""
    constants = getattr(ipaddress, "_IPv4Constants", None)
    try:
        networks = [
            *constants._private_networks,  # type: ignore[union-attr]
            constants._public_network,  # type: ignore[union-attr]  # 100.64/10, "shared"
            constants._multicast_network,  # type: ignore[union-attr]
        ]
    except AttributeError:
        return None
    ranges = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
    starts: list[int] = []
    ends: list[int] = []
    for start, end in ranges:
        if starts and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    edges = {e + d for pair in zip(starts, ends, strict=True) for e in pair for d in (-1, 0, 1)}
    for number in edges:
        if 0 <= number < 2**32:
            text = str(ipaddress.IPv4Address(number))
            i = bisect.bisect_right(starts, number) - 1
            if (not (i >= 0 and number <= ends[i])) != _slow_is_routable(text):
                return None
    return starts, ends


_V4_NOT_ROUTABLE = _v4_table()
