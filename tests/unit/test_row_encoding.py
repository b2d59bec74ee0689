"""The ``rows`` wire encoding of ``shared.messages``: what it writes decodes to the same rows,
and it writes byte for byte what the resolver's hand-written encoder wrote before it."""

from __future__ import annotations

import json
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from services.resolver.cache import DirtyEntry
from services.resolver.geo import Geo
from shared.ipnorm import normalize_ip
from shared.messages import (
    COUNTRY_CODES,
    MAX_ROWS_PER_UPSERT,
    MAX_TEXT,
    GeoRow,
    GeoUpsertBatch,
    IpResolved,
    Resolution,
    decode_rows,
    encode_geo_rows,
    encode_rows,
    iso_utc_from_epoch,
    resolved_body,
    upsert_body,
)

_FORBIDDEN = "".join(
    [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))]
    + ["<", ">"]
    + [chr(c) for c in (*range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2066, 0x206A))]
)
text = st.text(
    st.characters(codec="utf-8", blacklist_characters=_FORBIDDEN),
    min_size=1,
    max_size=MAX_TEXT,
)
ips = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: normalize_ip(str(a)))
)
moments = st.floats(min_value=0, max_value=4_102_444_799.0, allow_nan=False)
codes = st.sampled_from(sorted(COUNTRY_CODES))
asns = st.integers(min_value=0, max_value=9_999_999_999).map(lambda n: f"AS{n}")
providers = st.none() | st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,31}\Z")


@st.composite
def geos(draw: st.DrawFn) -> Geo:
    resolution = draw(st.sampled_from(Resolution))
    provider = draw(providers)
    if resolution is not Resolution.RESOLVED:
        return Geo(None, None, None, None, resolution, provider)
    optional = st.none() | text
    return Geo(
        draw(codes), draw(optional), draw(st.none() | asns), draw(optional), resolution, provider
    )


def as_row(ip: str, geo: Geo, at: float) -> GeoRow:
    return GeoRow(
        ip, geo.resolution, iso_utc_from_epoch(at), geo.country_code, geo.country_name, geo.asn,
        geo.org, geo.provider,
    )  # fmt: skip


entries = st.lists(
    st.builds(DirtyEntry, ips, geos(), moments), min_size=1, max_size=MAX_ROWS_PER_UPSERT // 20
)
# A delivery's IPs share their stamp and a few answers: the shape the flush encodes.
shared_entries = st.builds(
    lambda ips, geos, at: [DirtyEntry(ip, geos[i % len(geos)], at) for i, ip in enumerate(ips)],
    st.lists(ips, min_size=1, max_size=50),
    st.lists(geos(), min_size=1, max_size=4),
    moments,
)


def reference_rows_json(entries: Sequence[DirtyEntry]) -> bytes:
    """The resolver's encoder before ``encode_rows`` (handlers.py ``_rows_json``), verbatim."""
    stamps: dict[float, str] = {}
    for at in {e.resolved_at for e in entries}:
        stamps[at] = iso_utc_from_epoch(at)
    return json.dumps(
        [
            (
                e.ip,
                e.geo.resolution,
                stamps[e.resolved_at],
                e.geo.country_code,
                e.geo.country_name,
                e.geo.asn,
                e.geo.org,
                e.geo.provider,
            )
            for e in entries
        ],
        separators=(",", ":"),
    ).encode()


@settings(max_examples=200)
@given(entries | shared_entries)
def test_encoding_is_byte_identical_to_the_former_encoder(rows: list[DirtyEntry]) -> None:
    assert encode_rows(rows) == reference_rows_json(rows)


@settings(max_examples=200)
@given(entries | shared_entries)
def test_every_valid_row_decodes_to_itself(rows: list[DirtyEntry]) -> None:
    expected = [as_row(*entry) for entry in rows]
    encoded = encode_rows(rows)
    assert decode_rows(encoded) == expected
    assert encode_geo_rows(expected) == encoded  # ready rows encode alike
    assert GeoUpsertBatch.model_validate_json(upsert_body("b1", encoded)).rows == expected
    assert IpResolved.model_validate_json(resolved_body(encoded)).rows == expected


def test_an_upsert_body_is_the_one_the_resolver_always_sent() -> None:
    rows = encode_rows(
        [DirtyEntry("8.8.8.8", Geo("US", None, None, None, Resolution.RESOLVED, "x"), 0.5)]
    )
    assert upsert_body("ab12", rows) == b'{"batch_id":"ab12","rows":%s}' % rows
    assert resolved_body(rows) == b'{"rows":%s}' % rows
