"""IP address normalization and the "is it worth a lookup" rule, pure and shared by all services.

One spelling per address keeps the cache, the dirty set and the ``geo_cache`` primary key in step:
compressed form, and IPv4-mapped IPv6 (``::ffff:1.2.3.4``) folded into plain IPv4.
"""

from __future__ import annotations

import ipaddress


def normalize_ip(value: str) -> str:
    """Return the canonical text of an IP address; raise ``ValueError`` naming the bad input."""
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
    (which ``is_global`` counts as global but no geolocation source covers)."""
    address = ipaddress.ip_address(ip)
    return address.is_global and not address.is_multicast
