"""Small MaxMind DB files built by the tests, shaped like the real GeoLite2 and DB-IP Lite ones.

Shipping real databases would tie the tests to a licence and a release; these records carry the
same field layout (nested ``country.iso_code`` / ``country.names.en``, ``autonomous_system_*``),
plus a few fields the provider must ignore, so the mapping is tested against the real shapes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

Record = dict[str, Any]


def write_mmdb(
    path: Path,
    networks: Mapping[str, Record],
    *,
    database_type: str = "GeoLite2-Country",
    ip_version: int = 6,
) -> Path:
    """Write ``networks`` (CIDR -> record) to ``path``, replacing any old file by rename."""
    writer = MMDBWriter(
        ip_version=ip_version,
        ipv4_compatible=ip_version == 6,
        database_type=database_type,
        languages=["en"],
        description=f"bangui-geo test {database_type}",
    )
    for cidr, record in networks.items():
        writer.insert_network(IPSet([cidr]), record)
    partial = path.with_name(path.name + ".partial")
    writer.to_db_file(str(partial))
    os.replace(partial, path)  # what geoipupdate does: readers never see a half-written file
    return path


def _names(en: str) -> dict[str, str]:
    return {"de": f"{en} (de)", "en": en, "fr": f"{en} (fr)"}


def geolite2_country(code: str, name: str, *, registered: str | None = None) -> Record:
    reg = registered or code
    return {
        "continent": {"code": "EU", "geoname_id": 6255148, "names": _names("Europe")},
        "country": {"geoname_id": 2921044, "iso_code": code, "names": _names(name)},
        "registered_country": {"geoname_id": 2921044, "iso_code": reg, "names": _names(reg)},
    }


def geolite2_city(code: str, name: str, city: str) -> Record:
    return {
        **geolite2_country(code, name),
        "city": {"geoname_id": 2950159, "names": _names(city)},
        "location": {"accuracy_radius": 20, "latitude": 52.52, "longitude": 13.40},
        "postal": {"code": "10115"},
        "subdivisions": [{"geoname_id": 2950157, "iso_code": "BE", "names": _names("Land")}],
    }


def registered_only(code: str, name: str) -> Record:
    """GeoLite2's shape for anycast and some satellite blocks: no ``country`` key."""
    return {"registered_country": {"geoname_id": 6252001, "iso_code": code, "names": _names(name)}}


def dbip_country(code: str, name: str) -> Record:
    """DB-IP Lite country: ``country`` with ``is_in_european_union`` and no registered_country."""
    return {
        "continent": {"code": "EU", "geoname_id": 6255148, "names": _names("Europe")},
        "country": {
            "geoname_id": 2921044,
            "is_in_european_union": True,
            "iso_code": code,
            "names": _names(name),
        },
    }


def asn(number: int, org: str) -> Record:
    """GeoLite2-ASN and DB-IP Lite ASN use the same two fields."""
    return {"autonomous_system_number": number, "autonomous_system_organization": org}
