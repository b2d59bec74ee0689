"""The mmdb provider in the running services: rows carry the database's country, ASN and org; a
chain falls back to the embedded data; a missing or broken file stops the resolver at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bangui_geo.testing import (
    ServiceGroup,
    async_poll,
    publish,
)
from tests.mmdb_files import asn, dbip_country, geolite2_city, registered_only, write_mmdb

pytestmark = pytest.mark.integration

GB, NL6, ANYCAST, SE, ASN_ONLY, NOWHERE = (
    "81.2.69.142",
    "2001:67c:2e8::1",
    "1.1.1.1",
    "89.160.20.112",
    "9.9.9.9",
    "8.8.8.8",
)


@pytest.fixture
def mmdb_files(tmp_path: Path) -> tuple[Path, Path]:
    country = write_mmdb(
        tmp_path / "GeoLite2-City.mmdb",
        {
            "81.2.69.0/24": geolite2_city("GB", "United Kingdom", "London"),
            "2001:67c:2e8::/48": dbip_country("NL", "Netherlands"),
            "1.1.1.0/24": registered_only("AU", "Australia"),
            "89.160.20.0/24": geolite2_city("SE", "Sweden", "Linköping"),
        },
        database_type="GeoLite2-City",
    )
    asn_file = write_mmdb(
        tmp_path / "GeoLite2-ASN.mmdb",
        {
            "81.2.69.0/24": asn(20712, "Andrews & Arnold Ltd"),
            "2001:67c:2e8::/48": asn(3333, "RIPE NCC"),
            "1.1.1.0/24": asn(13335, "CLOUDFLARENET"),
            "9.9.9.0/24": asn(19281, "Quad9"),
        },
        database_type="GeoLite2-ASN",
    )
    return country, asn_file


async def rows_for(group: ServiceGroup, ips: list[str]) -> dict[str, tuple[Any, ...]]:
    """(country_code, country_name, asn, org, resolution, provider) for each of ``ips``, once the
    services (started) have written them; then they stop, each with exit code 0."""
    await publish(group.amqp_url, "ip.seen", [{"ips": ips}])

    def all_rows() -> dict[str, tuple[Any, ...]] | None:
        rows = group.rows()
        return rows if set(ips) <= set(rows) else None

    rows: dict[str, tuple[Any, ...]] = await async_poll(
        all_rows, deadline_s=20, what=f"rows for {ips}"
    )
    assert group.stop_all() == {"timer": 0, "resolver": 0, "persistence": 0}
    return {ip: (*rows[ip][:4], *rows[ip][5:]) for ip in ips}


async def test_rows_carry_the_databases_country_asn_and_org(
    service_group: ServiceGroup, mmdb_files: tuple[Path, Path]
) -> None:
    country, asn_file = mmdb_files
    await service_group.start_pipeline(
        GEO_PROVIDER="mmdb", GEO_MMDB_PATH=str(country), GEO_MMDB_ASN_PATH=str(asn_file)
    )
    rows = await rows_for(service_group, [GB, NL6, ANYCAST, SE, ASN_ONLY, NOWHERE])
    assert rows == {
        GB: ("GB", "United Kingdom", "AS20712", "Andrews & Arnold Ltd", "resolved", "mmdb"),
        NL6: ("NL", "Netherlands", "AS3333", "RIPE NCC", "resolved", "mmdb"),
        ANYCAST: ("AU", "Australia", "AS13335", "CLOUDFLARENET", "resolved", "mmdb"),
        SE: ("SE", "Sweden", None, None, "resolved", "mmdb"),
        # Not in the country file: a negative, kept for re-resolve (an ASN alone is no answer).
        ASN_ONLY: (None, None, None, None, "failed", None),
        NOWHERE: (None, None, None, None, "failed", None),
    }


async def test_chain_falls_back_to_the_embedded_country(
    service_group: ServiceGroup, mmdb_files: tuple[Path, Path]
) -> None:
    country, asn_file = mmdb_files
    await service_group.start_pipeline(
        GEO_PROVIDER="mmdb,embedded",
        GEO_MMDB_PATH=str(country),
        GEO_MMDB_ASN_PATH=str(asn_file),
    )
    rows = await rows_for(service_group, [GB, ASN_ONLY, NOWHERE])
    assert rows == {
        GB: ("GB", "United Kingdom", "AS20712", "Andrews & Arnold Ltd", "resolved", "mmdb"),
        ASN_ONLY: ("US", "United States", None, None, "resolved", "embedded"),
        NOWHERE: ("US", "United States", None, None, "resolved", "embedded"),
    }


async def test_corrupt_file_stops_the_resolver_naming_the_variable(
    service_group: ServiceGroup, tmp_path: Path
) -> None:
    garbage = tmp_path / "GeoLite2-Country.mmdb"
    garbage.write_bytes(b"this is an HTML error page, not a database\n" * 50)
    resolver = service_group.start("resolver", GEO_PROVIDER="mmdb", GEO_MMDB_PATH=str(garbage))
    assert resolver.process is not None
    assert resolver.process.wait(timeout=15) == 1
    crashed = [e for e in resolver.log_events() if e.get("event") == "service_crashed"]
    assert len(crashed) == 1
    assert f"GEO_MMDB_PATH: cannot open {garbage} as a MaxMind DB" in crashed[0]["error"]
