"""One spelling per address, and the rule that decides whether an address is worth a lookup."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import ipnorm
from shared.ipnorm import is_routable, normalize_ip


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("8.8.8.8", "8.8.8.8"),
        ("2001:4860:4860:0:0:0:0:8888", "2001:4860:4860::8888"),
        ("2001:4860:4860:0000:0000:0000:0000:8888", "2001:4860:4860::8888"),
        ("2001:DB8::A", "2001:db8::a"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::FFFF:8.8.8.8", "8.8.8.8"),
        ("::ffff:0102:0304", "1.2.3.4"),
        ("::1", "::1"),
    ],
)
def test_normalize_gives_the_canonical_spelling(raw: str, normal: str) -> None:
    assert normalize_ip(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "01.2.3.4",
        "1.2.3.04",
        "not-an-ip",
        "",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4/32",
        " 1.2.3.4",
        ":::1",
        "fe80::1%eth0",  # a zone index would give one address many spellings
        "2606:4700:4700::1111%1",
        "::ffff:8.8.8.8%x",
    ],
)
def test_normalize_rejects_garbage_naming_the_input(raw: str) -> None:
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address") as info:
        normalize_ip(raw)
    assert repr(raw) in str(info.value)


def test_normalize_shortens_a_huge_input_in_its_message() -> None:
    with pytest.raises(ValueError, match="not an IPv4") as info:
        normalize_ip("x" * 10_000)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",  # private
        "172.16.5.4",
        "192.168.1.1",
        "fc00::1",  # unique local
        "127.0.0.1",  # loopback
        "::1",
        "169.254.1.1",  # link-local
        "fe80::1",
        "100.64.0.1",  # shared address space (CGNAT)
        "100.127.255.254",
        "0.0.0.0",  # unspecified
        "::",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "198.51.100.7",
        "203.0.113.9",
        "2001:db8::1",
    ],
)
def test_non_global_addresses_are_not_routable(ip: str) -> None:
    assert not is_routable(ip)


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "1.1.1.1", "193.0.6.139", "2001:4860:4860::8888", "2606:4700:4700::1111"]
)
def test_public_addresses_are_routable(ip: str) -> None:
    assert is_routable(ip)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_fast_ipv4_rule_agrees_with_the_stdlib(number: int) -> None:
    text = str(ipaddress.IPv4Address(number))
    address = ipaddress.IPv4Address(number)
    assert is_routable(text) == (address.is_global and not address.is_multicast)


def test_fast_ipv4_rule_is_in_use_on_this_python() -> None:
    assert ipnorm._V4_NOT_ROUTABLE is not None  # else every check pays ~6 us of is_global


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("::11.0.0.26", "::b00:1a"),  # IPv4-compatible (deprecated): is_global says global
        ("::8.8.8.8", "::808:808"),
        ("64:ff9b::8.8.8.8", "64:ff9b::808:808"),  # NAT64, synthesized locally
        ("4000::1", "4000::1"),  # reserved by the IETF, allocated to no one
        ("1::1", "1::1"),
    ],
)
def test_ipv6_outside_global_unicast_is_not_routable(raw: str, normal: str) -> None:
    # Not routable, so the resolver stores it as not_global once and re-resolve never retries it.
    assert normalize_ip(raw) == normal
    assert not is_routable(normal)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_ipv6_routable_only_in_global_unicast_and_where_the_stdlib_says_global(
    number: int,
) -> None:
    address = ipaddress.IPv6Address(number)
    if address.ipv4_mapped is not None:
        return  # normalized to IPv4 before any is_routable call
    in_2000_3 = address in ipaddress.IPv6Network("2000::/3")
    assert is_routable(address.compressed) == (in_2000_3 and address.is_global)
