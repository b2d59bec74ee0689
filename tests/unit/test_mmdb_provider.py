"""The mmdb provider against small GeoLite2- and DB-IP-shaped files built here: field mapping,
what is left out, hot reload, and the errors that stop a misconfigured service at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.resolver.bootstrap import build_lookup
from services.resolver.geo import Geo
from services.resolver.provider_files import check_provider_files
from services.resolver.providers.mmdb import MmdbProvider, MmdbUnavailable
from shared.messages import Resolution
from shared.settings import Settings, SettingsError, load_settings
from tests.fakes import ManualClock
from tests.mmdb_files import (
    asn,
    dbip_country,
    geolite2_city,
    geolite2_country,
    registered_only,
    write_mmdb,
)

GB_V4, SE_V4, NL_V6, ANYCAST, ASN_ONLY, NOWHERE = (
    "81.2.69.142",
    "89.160.20.112",
    "2001:67c:2e8::1",
    "1.1.1.1",
    "9.9.9.9",
    "8.8.8.8",
)
COUNTRIES = {
    "81.2.69.0/24": geolite2_country("GB", "United Kingdom"),
    "89.160.20.0/24": geolite2_country("SE", "Sweden"),
    "2001:67c:2e8::/48": geolite2_country("NL", "Netherlands"),
    "1.1.1.0/24": registered_only("AU", "Australia"),
}
ASNS = {
    "81.2.69.0/24": asn(20712, "Andrews & Arnold Ltd"),
    "2001:67c:2e8::/48": asn(3333, "Reseaux IP Europeens Network Coordination Centre (RIPE NCC)"),
    "9.9.9.0/24": asn(19281, "Quad9"),
}


def resolved(code: str, name: str, asn_: str | None = None, org: str | None = None) -> Geo:
    return Geo(code, name, asn_, org, Resolution.RESOLVED, "mmdb")


@pytest.fixture
def country_db(tmp_path: Path) -> Path:
    return write_mmdb(tmp_path / "GeoLite2-Country.mmdb", COUNTRIES)


@pytest.fixture
def asn_db(tmp_path: Path) -> Path:
    return write_mmdb(tmp_path / "GeoLite2-ASN.mmdb", ASNS, database_type="GeoLite2-ASN")


async def test_country_db_alone_gives_country_and_name_for_ipv4_and_ipv6(country_db: Path) -> None:
    provider = MmdbProvider(country_db)
    answers = await provider.lookup([GB_V4, SE_V4, NL_V6])
    assert answers == {
        GB_V4: resolved("GB", "United Kingdom"),
        SE_V4: resolved("SE", "Sweden"),
        NL_V6: resolved("NL", "Netherlands"),
    }
    await provider.close()


async def test_city_and_asn_files_map_country_asn_and_org(tmp_path: Path, asn_db: Path) -> None:
    city = write_mmdb(
        tmp_path / "GeoLite2-City.mmdb",
        {"81.2.69.0/24": geolite2_city("GB", "United Kingdom", "London")},
        database_type="GeoLite2-City",
    )
    provider = MmdbProvider(city, asn_db)
    answers = await provider.lookup([GB_V4])
    assert answers == {GB_V4: resolved("GB", "United Kingdom", "AS20712", "Andrews & Arnold Ltd")}
    await provider.close()


async def test_dbip_lite_country_and_asn_files(tmp_path: Path) -> None:
    country = write_mmdb(
        tmp_path / "dbip-country-lite.mmdb",
        {"2001:67c:2e8::/48": dbip_country("NL", "Netherlands")},
        database_type="DBIP-Country-Lite",
    )
    asn_file = write_mmdb(
        tmp_path / "dbip-asn-lite.mmdb",
        {"2001:67c:2e8::/48": asn(3333, "RIPE NCC")},
        database_type="DBIP-ASN-Lite (compat=GeoLite2-ASN)",
    )
    provider = MmdbProvider(country, asn_file)
    assert await provider.lookup([NL_V6]) == {
        NL_V6: resolved("NL", "Netherlands", "AS3333", "RIPE NCC")
    }
    await provider.close()


async def test_unknown_and_asn_only_ips_are_left_out_for_the_next_provider(
    country_db: Path, asn_db: Path
) -> None:
    provider = MmdbProvider(country_db, asn_db)
    answers = await provider.lookup([NOWHERE, ASN_ONLY, "2a00:1450::1", GB_V4])
    assert set(answers) == {GB_V4}
    await provider.close()


async def test_registered_country_stands_in_when_country_is_missing(country_db: Path) -> None:
    provider = MmdbProvider(country_db)
    assert await provider.lookup([ANYCAST]) == {ANYCAST: resolved("AU", "Australia")}
    await provider.close()


async def test_missing_english_name_falls_back_to_the_iso_name(tmp_path: Path) -> None:
    record = {"country": {"iso_code": "de", "names": {"fr": "Allemagne"}}}
    db = write_mmdb(tmp_path / "c.mmdb", {"81.2.69.0/24": record})
    provider = MmdbProvider(db)
    assert await provider.lookup([GB_V4]) == {GB_V4: resolved("DE", "Germany")}
    await provider.close()


async def test_malformed_country_code_is_not_an_answer(tmp_path: Path) -> None:
    record = {"country": {"iso_code": "GBR", "names": {"en": "United Kingdom"}}}
    db = write_mmdb(tmp_path / "c.mmdb", {"81.2.69.0/24": record})
    provider = MmdbProvider(db)
    assert await provider.lookup([GB_V4]) == {}
    await provider.close()


async def test_only_codes_and_names_persistence_stores_are_answers(tmp_path: Path) -> None:
    # An unassigned code (DB-IP's ZZ) would get the whole geo.upsert batch dead-lettered, so it
    # is no answer; a name with markup or beyond 200 characters is cleaned, not passed on.
    records = {
        "81.2.69.0/24": {"country": {"iso_code": "ZZ", "names": {"en": "Unknown"}}},
        "89.160.20.0/24": {"country": {"iso_code": "SE", "names": {"en": "<b>Sweden</b>"}}},
    }
    db = write_mmdb(tmp_path / "c.mmdb", records)
    provider = MmdbProvider(db)
    assert await provider.lookup([GB_V4, "89.160.20.1"]) == {
        "89.160.20.1": resolved("SE", "bSweden/b")
    }
    await provider.close()


async def test_ipv4_only_file_leaves_ipv6_out_without_error(tmp_path: Path) -> None:
    db = write_mmdb(tmp_path / "v4.mmdb", {"81.2.69.0/24": COUNTRIES["81.2.69.0/24"]}, ip_version=4)
    provider = MmdbProvider(db)
    assert set(await provider.lookup([GB_V4, NL_V6])) == {GB_V4}
    await provider.close()


async def test_replaced_file_is_picked_up_after_the_check_interval(country_db: Path) -> None:
    clock = ManualClock()
    with capture_logs() as logs:
        provider = MmdbProvider(country_db, check_interval=5.0, clock=clock)
        write_mmdb(country_db, {"81.2.69.0/24": geolite2_country("IE", "Ireland")})
        clock.advance(4.9)
        assert (await provider.lookup([GB_V4]))[GB_V4].country_code == "GB"
        clock.advance(0.2)
        answers = await provider.lookup([GB_V4, SE_V4])
    assert answers == {GB_V4: resolved("IE", "Ireland")}
    assert [e["event"] for e in logs] == ["mmdb_opened", "mmdb_reloaded"]
    await provider.close()


async def test_broken_replacement_keeps_the_old_data_and_is_reported_once(
    country_db: Path, asn_db: Path
) -> None:
    clock = ManualClock()
    with capture_logs() as logs:
        provider = MmdbProvider(country_db, asn_db, check_interval=1.0, clock=clock)
        broken = country_db.with_name("broken")
        broken.write_bytes(b"not a maxmind db" * 100)
        os.replace(broken, country_db)
        for _ in range(3):
            clock.advance(1.0)
            answers = await provider.lookup([GB_V4])
            assert answers[GB_V4] == resolved(
                "GB", "United Kingdom", "AS20712", "Andrews & Arnold Ltd"
            )
        write_mmdb(country_db, {"81.2.69.0/24": geolite2_country("IE", "Ireland")})
        clock.advance(1.0)
        assert (await provider.lookup([GB_V4]))[GB_V4].country_code == "IE"
    events = [e["event"] for e in logs]
    assert events == ["mmdb_opened", "mmdb_opened", "mmdb_reload_failed", "mmdb_reloaded"]
    failed = logs[2]
    assert failed["variable"] == "GEO_MMDB_PATH"
    assert failed["path"] == str(country_db)
    await provider.close()


async def test_removed_file_keeps_the_old_data_until_it_comes_back(country_db: Path) -> None:
    clock = ManualClock()
    provider = MmdbProvider(country_db, check_interval=1.0, clock=clock)
    os.remove(country_db)
    clock.advance(1.0)
    assert (await provider.lookup([GB_V4]))[GB_V4].country_code == "GB"
    write_mmdb(country_db, {"81.2.69.0/24": geolite2_country("IE", "Ireland")})
    clock.advance(1.0)
    assert (await provider.lookup([GB_V4]))[GB_V4].country_code == "IE"
    await provider.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="private copies need memfd (Linux)")
async def test_file_overwritten_in_place_does_not_crash_the_reader(country_db: Path) -> None:
    # A reader mapping the operator's file would now see garbage, or die of SIGBUS once the
    # file is larger than a page; the private copy keeps answering from what was loaded.
    provider = MmdbProvider(country_db, check_interval=3600.0)
    with country_db.open("r+b") as f:
        f.truncate(16)
    assert await provider.lookup([GB_V4, SE_V4, NL_V6, ANYCAST]) == {
        GB_V4: resolved("GB", "United Kingdom"),
        SE_V4: resolved("SE", "Sweden"),
        NL_V6: resolved("NL", "Netherlands"),
        ANYCAST: resolved("AU", "Australia"),
    }
    await provider.close()


def test_missing_file_is_a_clear_error_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "GeoLite2-Country.mmdb"
    with pytest.raises(MmdbUnavailable) as caught:
        MmdbProvider(missing)
    assert str(caught.value) == f"GEO_MMDB_PATH: cannot read {missing}: No such file or directory"


def test_missing_asn_file_names_its_own_variable(country_db: Path, tmp_path: Path) -> None:
    with pytest.raises(MmdbUnavailable, match=r"^GEO_MMDB_ASN_PATH: cannot read .*asn\.mmdb"):
        MmdbProvider(country_db, tmp_path / "asn.mmdb")


def test_unreadable_or_invalid_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MmdbUnavailable, match=r"^GEO_MMDB_PATH: cannot read .*: Is a directory"):
        MmdbProvider(tmp_path)
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(MmdbUnavailable) as caught:
        MmdbProvider(garbage)
    message = str(caught.value)
    assert message.startswith(f"GEO_MMDB_PATH: cannot open {garbage} as a MaxMind DB")
    assert "/proc/" not in message  # the private copy's name would only confuse an operator


@pytest.mark.parametrize("variable", ["GEO_MMDB_PATH", "GEO_MMDB_ASN_PATH"])
def test_settings_refuse_a_missing_mmdb_file(
    variable: str, country_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.mmdb"
    monkeypatch.setenv("GEO_PROVIDER", "mmdb,embedded")
    monkeypatch.setenv("GEO_MMDB_PATH", str(country_db))
    monkeypatch.setenv(variable, str(missing))
    settings = load_settings()  # the other services share this environment and must start
    with pytest.raises(SettingsError) as caught:
        check_provider_files(settings)  # the resolver's own start check
    assert str(caught.value) == f"{variable}: cannot read {missing}: No such file or directory"


def test_settings_ignore_mmdb_files_when_no_provider_reads_them(tmp_path: Path) -> None:
    settings = Settings(provider="embedded", mmdb_path=tmp_path / "missing.mmdb")
    assert settings.mmdb_path == tmp_path / "missing.mmdb"


async def test_bootstrap_builds_an_mmdb_chain_from_settings(country_db: Path, asn_db: Path) -> None:
    settings = Settings(provider="mmdb,embedded", mmdb_path=country_db, mmdb_asn_path=asn_db)
    chain = build_lookup(settings)
    answers = await chain.lookup([GB_V4, NOWHERE])
    assert chain.name == "mmdb,embedded"
    assert answers[GB_V4] == resolved("GB", "United Kingdom", "AS20712", "Andrews & Arnold Ltd")
    assert (answers[NOWHERE].country_code, answers[NOWHERE].provider) == ("US", "embedded")
    await chain.close()
