"""The message contract: what each model accepts and refuses, and a snapshot of the JSON schemas
so that any contract change shows up in review (rewrite it with GEO_UPDATE_SNAPSHOTS=1)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pycountry
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.messages import (
    COUNTRY_CODES,
    MESSAGE_MODELS,
    GeoRow,
    GeoUpsertBatch,
    IpResolved,
    IpSeen,
    Resolution,
    RetryUnresolved,
    clean_asn,
    clean_text,
    iso_utc,
    iso_utc_from_epoch,
)

SNAPSHOT = Path(__file__).with_name("message_schemas.json")
WHEN = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)

GEO_ROW = TypeAdapter(GeoRow)


def ips(n: int) -> list[str]:
    return [f"11.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(n)]


def row(ip: str = "8.8.8.8", **overrides: Any) -> dict[str, Any]:
    return {"ip": ip, "resolution": "failed", "cached_at": iso_utc(WHEN), **overrides}


def test_ip_seen_single() -> None:
    event = IpSeen.model_validate({"ip": "::ffff:8.8.8.8"})
    assert event.ip == "8.8.8.8"
    assert event.ips is None
    assert event.addresses == ["8.8.8.8"]


def test_ip_seen_bulk_keeps_order_and_duplicates_normalized() -> None:
    event = IpSeen.model_validate({"ips": ["1.1.1.1", "2001:DB8::1", "1.1.1.1"]})
    assert event.addresses == ["1.1.1.1", "2001:db8::1", "1.1.1.1"]


def test_ip_seen_ignores_extra_fields() -> None:
    event = IpSeen.model_validate_json(
        b'{"ip": "8.8.8.8", "source": "fail2ban", "jail": "sshd", "seen_at": 1}'
    )
    assert event.addresses == ["8.8.8.8"]
    assert "jail" not in event.model_dump()


@pytest.mark.parametrize(
    "body", [{}, {"ip": "8.8.8.8", "ips": ["1.1.1.1"]}, {"ip": None, "ips": None}]
)
def test_ip_seen_needs_exactly_one_of_ip_or_ips(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of 'ip' or 'ips'"):
        IpSeen.model_validate(body)


def test_ip_seen_takes_up_to_1000_ips() -> None:
    assert len(IpSeen(ips=ips(1000)).addresses) == 1000
    with pytest.raises(ValidationError, match="at most 1000"):
        IpSeen(ips=ips(1001))


def test_ip_seen_refuses_an_empty_list() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        IpSeen.model_validate({"ips": []})


@pytest.mark.parametrize(
    "body",
    [{"ip": 134744072}, {"ip": ["8.8.8.8"]}, {"ips": ["8.8.8.8", 5]}, {"ips": "8.8.8.8"}],
)
def test_ip_seen_refuses_non_strings(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=r"valid (string|array)"):
        IpSeen.model_validate_json(json.dumps(body))


def test_ip_seen_refuses_a_bad_address_naming_it() -> None:
    with pytest.raises(ValidationError, match="not an IPv4 or IPv6 address: 'nope'"):
        IpSeen.model_validate({"ips": ["8.8.8.8", "nope"]})


def test_models_are_frozen() -> None:
    event = IpSeen(ip="8.8.8.8")
    with pytest.raises(ValidationError, match="frozen"):
        event.ip = "1.1.1.1"  # type: ignore[misc]


def test_retry_unresolved_normalizes_and_bounds_its_ips() -> None:
    cmd = RetryUnresolved.model_validate({"tick_id": "re_resolve:1.000", "ips": ["::ffff:1.2.3.4"]})
    assert cmd.ips == ["1.2.3.4"]
    with pytest.raises(ValidationError, match="at least 1"):
        RetryUnresolved(tick_id="t", ips=[])
    with pytest.raises(ValidationError, match="at most 1000"):
        RetryUnresolved(tick_id="t", ips=ips(1001))
    with pytest.raises(ValidationError, match="tick_id"):
        RetryUnresolved.model_validate({"ips": ["8.8.8.8"]})


def test_geo_upsert_batch_takes_1_to_1000_rows() -> None:
    batch = GeoUpsertBatch.model_validate({"batch_id": "b", "rows": [row(ip) for ip in ips(1000)]})
    assert len(batch.rows) == 1000
    with pytest.raises(ValidationError, match="at least 1"):
        GeoUpsertBatch.model_validate({"batch_id": "b", "rows": []})
    with pytest.raises(ValidationError, match="at most 1000"):
        GeoUpsertBatch.model_validate({"batch_id": "b", "rows": [row(ip) for ip in ips(1001)]})


def test_geo_row_validates_its_fields() -> None:
    parsed = GEO_ROW.validate_python(
        row("8.8.8.8", country_code="US", resolution="resolved", provider="embedded")
    )
    assert parsed.ip == "8.8.8.8"
    # The resolver normalizes; persistence only checks the shape of what it stores.
    with pytest.raises(ValidationError, match="ip"):
        GEO_ROW.validate_python(row("8.8.8.8'); DROP TABLE geo_cache; --"))
    with pytest.raises(ValidationError, match="ip"):
        GEO_ROW.validate_python(row("1" * 46))
    on_the_wire = GeoUpsertBatch.model_validate(
        {"batch_id": "b", "rows": [parsed]}
    ).model_dump_json()
    assert '"rows":[["8.8.8.8","resolved",' in on_the_wire
    assert parsed.resolution is Resolution.RESOLVED
    assert parsed.cached_at == iso_utc(WHEN)
    with pytest.raises(ValidationError, match="country_code"):
        GEO_ROW.validate_python(row(country_code="USA"))
    with pytest.raises(ValidationError, match="resolution"):
        GEO_ROW.validate_python(row(resolution="maybe"))


def current_schemas() -> dict[str, Any]:
    return {model.__name__: model.model_json_schema() for model in MESSAGE_MODELS}


def render(schemas: dict[str, Any]) -> str:
    return json.dumps(schemas, sort_keys=True, indent=2) + "\n"


def test_message_schemas_match_the_snapshot() -> None:
    text = render(current_schemas())
    if os.environ.get("GEO_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert SNAPSHOT.exists(), f"{SNAPSHOT.name} is missing: run with GEO_UPDATE_SNAPSHOTS=1"
    assert SNAPSHOT.read_text(encoding="utf-8") == text, (
        "the message contract changed: review the diff, then rerun with GEO_UPDATE_SNAPSHOTS=1"
    )


def test_the_snapshot_covers_every_message_model() -> None:
    names = set(json.loads(SNAPSHOT.read_text(encoding="utf-8")))
    assert names == {model.__name__ for model in MESSAGE_MODELS}
    assert {"IpSeen", "FlushDirty", "ReResolveStale", "RetryUnresolved", "GeoUpsertBatch"} <= names


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_utc_from_epoch_matches_iso_utc_of_the_datetime(seconds: float) -> None:
    fast = iso_utc_from_epoch(seconds)
    exact = iso_utc(datetime.fromtimestamp(seconds, UTC))
    gap = datetime.fromisoformat(fast) - datetime.fromisoformat(exact)
    assert abs(gap.total_seconds()) <= 1e-6  # the same instant, rounding aside
    assert TypeAdapter(GeoRow).validate_python(("8.8.8.8", "failed", fast)).cached_at == fast


@pytest.mark.parametrize("model", MESSAGE_MODELS, ids=lambda m: m.__name__)
def test_every_documented_example_is_a_valid_value(model: type[Any]) -> None:
    """The examples end up in asyncapi.yaml, where publishers copy them."""
    for name, field in model.model_fields.items():
        kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        adapter: TypeAdapter[Any] = TypeAdapter(kind)
        for example in field.examples or []:
            try:
                adapter.validate_python(example)
            except ValidationError as exc:
                where = f"{model.__name__}.{name}"
                raise AssertionError(f"{where} example {example!r}: {exc}") from None


def upsert_row(*fields: Any) -> list[Any]:
    """A wire row (GeoRow order), the rest of its eight fields null."""
    return [*fields, *[None] * (8 - len(fields))]


def decode_rows(*rows: list[Any]) -> list[GeoRow]:
    body = json.dumps({"batch_id": "b", "rows": list(rows)})
    return list(GeoUpsertBatch.model_validate_json(body).rows)


STAMP = iso_utc(WHEN)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (upsert_row("ffff", "failed", STAMP), "rows.0.0"),
        (upsert_row("::::", "failed", STAMP), "not an IPv4 or IPv6 address"),
        (upsert_row("1.2.3.004", "failed", STAMP), "rows.0.0"),
        (upsert_row("1.2.3", "failed", STAMP), "rows.0.0"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "<s"), "rows.0.3"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "ZZ"), "rows.0.3"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "us"), "rows.0.3"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", "x" * 10_240), "at most 200"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", None, None, "o" * 10_240), "at most 200"),
        (
            upsert_row("8.8.8.8", "resolved", STAMP, "US", None, None, None, "p" * 10_240),
            "rows.0.7",
        ),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", "<script>alert(1)</script>"), "rows.0.4"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", None, None, "Evil\u202eCorp"), "rows.0.6"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", "a\nb"), "rows.0.4"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", None, "15169"), "rows.0.5"),
        (upsert_row("8.8.8.8", "resolved", STAMP, "US", None, "AS" + "1" * 11), "rows.0.5"),
        (upsert_row("8.8.8.8", "resolved", STAMP), "a resolved row needs a country_code"),
        (upsert_row("8.8.8.8", "failed", STAMP, "US"), "a failed row has no country_code"),
        (upsert_row("8.8.8.8", "not_global", STAMP, None, "X"), "a not_global row has no"),
        (upsert_row("8.8.8.8", "rejected", STAMP, None, None, None, "Org"), "a rejected row has"),
        (upsert_row("8.8.8.8", "failed", "2026-02-29T12:00:00.000000Z"), "rows.0.2"),
        (upsert_row("8.8.8.8", "failed", "2026-04-31T12:00:00.000000Z"), "rows.0.2"),
        (upsert_row("8.8.8.8", "failed", "2026-13-01T12:00:00.000000Z"), "rows.0.2"),
        (upsert_row("8.8.8.8", "failed", "2026-11-22T24:00:00.000000Z"), "rows.0.2"),
    ],
)
def test_geo_upsert_refuses_rows_that_are_junk(wire: list[Any], why: str) -> None:
    good = upsert_row("8.8.8.8", "resolved", STAMP, "US", "United States", None, None, "embedded")
    with pytest.raises(ValidationError) as info:
        decode_rows(good, wire)
    text = str(info.value).replace("rows.1", "rows.0").replace("row 1:", "row 0:")
    assert why in text


def test_geo_upsert_accepts_what_the_providers_produce() -> None:
    rows = decode_rows(
        upsert_row("8.8.8.8", "resolved", STAMP, "US", "United States", None, None, "embedded"),
        upsert_row(
            "1.1.1.1", "resolved", STAMP, "AU", "Australia", "AS13335", "Cloudflare, Inc.", "ip-api"
        ),
        upsert_row("2.2.2.2", "resolved", STAMP, "EU", "European Union", None, None, "embedded"),
        upsert_row("3.3.3.3", "resolved", STAMP, "XK", "Kosovo", None, None, "mmdb"),
        upsert_row("4.4.4.4", "resolved", STAMP, "CI", "Côte d'Ivoire", None, "AT&T", "mmdb"),
        upsert_row("9.9.9.9", "failed", STAMP),
        upsert_row("10.0.0.1", "not_global", STAMP),
        upsert_row("5.5.5.5", "rejected", STAMP, None, None, None, None, "ip-api"),
        upsert_row("6.6.6.6", "resolved", "2028-02-29T23:59:59.999999Z", "US"),
    )
    assert [r.country_code for r in rows] == ["US", "AU", "EU", "XK", "CI", None, None, None, "US"]


def test_geo_upsert_normalizes_ipv6_rows_as_ip_seen_does() -> None:
    rows = decode_rows(
        upsert_row("2001:DB8:0:0:0:0:0:1", "failed", STAMP),
        upsert_row("::ffff:8.8.8.8", "failed", STAMP),
        upsert_row("::11.0.0.26", "not_global", STAMP),
    )
    assert [r.ip for r in rows] == ["2001:db8::1", "8.8.8.8", "::b00:1a"]


def test_ip_resolved_rows_follow_the_same_rules() -> None:
    with pytest.raises(ValidationError, match=r"rows\.0\.3"):
        IpResolved.model_validate_json(
            json.dumps({"rows": [upsert_row("8.8.8.8", "resolved", STAMP, "<s")]})
        )


def test_clean_text_makes_a_provider_name_storable() -> None:
    assert clean_text("  Google\u202e <b>LLC</b>\x00 ") == "Google bLLC/b"
    assert clean_text("x" * 300) == "x" * 200
    assert clean_text("<>") is None
    assert clean_text(None) is None
    assert clean_asn("AS15169") == "AS15169"
    assert (
        clean_asn("AS\u0661\u0662\u0663") is None
    )  # Unicode digits: str.isdigit says yes, the row says no
    assert clean_asn("AS" + "9" * 11) is None


def test_the_country_codes_are_pycountrys_and_the_rir_ones() -> None:
    assert {c.alpha_2 for c in pycountry.countries} | {"EU", "AP", "XK"} == COUNTRY_CODES
