"""The ``mmdb`` provider: offline answers from MaxMind-format files (GeoLite2, DB-IP Lite).

Operators who cannot or will not call an online API point ``GEO_MMDB_PATH`` at a Country or City
database and, optionally, ``GEO_MMDB_ASN_PATH`` at an ASN database. An IP counts as answered only
when the country database gives it a country: an ASN without a country is left out, so the next
provider in the chain can still supply the country (the ASN is then lost, which beats a row with
no country that re-resolve would never retry).

Files are replaced by updaters while the service runs, so every ``check_interval`` seconds a
lookup first compares the file's inode, size and mtime with what it loaded, and reopens it in a
worker thread when they differ; a replacement that does not open keeps the old data and logs
``mmdb_reload_failed``. Each load reads the file into a private in-memory copy (``memfd``) that
the C reader maps: mapping the operator's file directly would crash the process with SIGBUS if
the file were overwritten in place (``curl -o``, ``gunzip >``) instead of renamed over. The cost is
RAM equal to the file size, twice that during a reload.

Lookups run on the loop in slices of ``SLICE`` IPs, yielding between slices: the C reader
decodes a whole GeoLite2 record per IP (about 6 us, plus 1 us for the ASN file), so a 1,000-IP
batch costs 6 to 12 ms but never holds the loop for more than about 2.5 ms. A worker thread would
not help: the C reader keeps the GIL while it reads.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import maxminddb
import structlog
from maxminddb.types import Record

from services.resolver.geo import Geo
from services.resolver.providers.embedded import country_name
from shared.messages import COUNTRY_CODES, Resolution, clean_text
from shared.settings import Settings

COUNTRY_VARIABLE = "GEO_MMDB_PATH"
ASN_VARIABLE = "GEO_MMDB_ASN_PATH"
_LOOKUP_ERRORS = (ValueError, maxminddb.InvalidDatabaseError)
SLICE = 256
"""IPs read between two yields to the loop: about 2.5 ms with a City file and an ASN file."""

Signature = tuple[int, int, int, int]
"""(device, inode, size, mtime in ns): a replaced or rewritten file changes at least one."""


class MmdbUnavailable(ValueError):
    """A configured .mmdb file is missing, unreadable or not a MaxMind DB; names the variable."""


@dataclass(frozen=True)
class _Loaded:
    reader: maxminddb.Reader
    signature: Signature
    ipv6: bool
    database_type: str
    build_epoch: int


class _Database:
    """One configured file: the reader in use and the file state it was loaded from."""

    def __init__(self, variable: str, path: Path) -> None:
        self.variable = variable
        self.path = path
        self.loaded = _load(variable, path)
        self.seen: Signature | None = self.loaded.signature

    def get(self, ip: str) -> Record | None:
        if ":" in ip and not self.loaded.ipv6:
            return None  # an IPv4-only file knows nothing about IPv6 (the reader would raise)
        return self.loaded.reader.get(ip)

    def close(self) -> None:
        self.loaded.reader.close()


class MmdbProvider:
    name = "mmdb"

    def __init__(
        self,
        path: Path,
        asn_path: Path | None = None,
        *,
        check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._log = log or structlog.get_logger("resolver")
        self._country = _Database(COUNTRY_VARIABLE, path)
        try:
            self._asn = None if asn_path is None else _Database(ASN_VARIABLE, asn_path)
        except BaseException:
            self._country.close()
            raise
        self._check_interval = check_interval
        self._clock = clock
        self._next_check = clock() + check_interval
        self._reload_lock = asyncio.Lock()
        for db in self._databases:
            self._log.info(
                "mmdb_opened",
                variable=db.variable,
                path=str(db.path),
                database_type=db.loaded.database_type,
                build_epoch=db.loaded.build_epoch,
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> MmdbProvider:
        if settings.mmdb_path is None:
            raise MmdbUnavailable(f"{COUNTRY_VARIABLE} is required by the mmdb provider")
        return cls(settings.mmdb_path, settings.mmdb_asn_path)

    @property
    def _databases(self) -> tuple[_Database, ...]:
        return (self._country,) if self._asn is None else (self._country, self._asn)

    async def lookup(self, ips: Sequence[str]) -> Mapping[str, Geo]:
        await self._reload_if_replaced()
        answers: dict[str, Geo] = {}
        errors = 0
        for start in range(0, len(ips), SLICE):
            if start:
                await asyncio.sleep(0)  # let the loop run between slices of a large batch
            errors += self._lookup_slice(ips[start : start + SLICE], answers)
        if errors:
            self._log.warning("mmdb_lookups_failed", ips=len(ips), errors=errors)
        return answers

    def _lookup_slice(self, ips: Sequence[str], answers: dict[str, Geo]) -> int:
        """Add the answers for ``ips`` to ``answers``; return how many reads raised."""
        country_db, asn_db = self._country, self._asn
        errors = 0
        for ip in ips:
            try:
                code, name = _country(country_db.get(ip))
            except _LOOKUP_ERRORS:
                errors += 1
                continue
            if code is None:
                continue
            asn = org = None
            if asn_db is not None:
                try:
                    asn, org = _asn(asn_db.get(ip))
                except _LOOKUP_ERRORS:
                    errors += 1
            answers[ip] = _geo(code, name, asn, org)
        return errors

    async def close(self) -> None:
        for db in reversed(self._databases):
            db.close()

    async def _reload_if_replaced(self) -> None:
        now = self._clock()
        if now < self._next_check or self._reload_lock.locked():
            return
        self._next_check = now + self._check_interval
        async with self._reload_lock:
            for db in self._databases:
                await self._reload(db)

    async def _reload(self, db: _Database) -> None:
        current = _signature_of(db.path)
        if current == db.seen:
            return
        # Remember this state even if it fails to load, so a broken file is reported once and
        # retried only when it changes again (a file caught mid-write changes again when done).
        db.seen = current
        try:
            loaded = await asyncio.to_thread(_load, db.variable, db.path)
        except MmdbUnavailable as exc:
            self._log.warning(
                "mmdb_reload_failed", variable=db.variable, path=str(db.path), error=str(exc)
            )
            return
        # Lookups read ``db.loaded`` afresh for every IP, on this thread: none holds the old one.
        old, db.loaded = db.loaded, loaded
        old.reader.close()
        self._log.info(
            "mmdb_reloaded",
            variable=db.variable,
            path=str(db.path),
            database_type=loaded.database_type,
            build_epoch=loaded.build_epoch,
        )


def _signature_of(path: Path) -> Signature | None:
    try:
        return _signature(path.stat())
    except OSError:
        return None


def _signature(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _load(variable: str, path: Path) -> _Loaded:
    """Open ``path`` from a private copy; raise ``MmdbUnavailable`` naming ``variable``."""
    try:
        with path.open("rb") as source:
            signature = _signature(os.fstat(source.fileno()))
            reader = _open_private_copy(source, path)
    except OSError as exc:
        raise MmdbUnavailable(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # InvalidDatabaseError, or whatever else a bad file provokes
        raise MmdbUnavailable(f"{variable}: cannot open {path} as a MaxMind DB: {exc}") from exc
    metadata = reader.metadata()
    return _Loaded(
        reader=reader,
        signature=signature,
        ipv6=metadata.ip_version == 6,
        database_type=str(metadata.database_type),
        build_epoch=int(metadata.build_epoch),
    )


def _open_private_copy(source: BinaryIO, path: Path) -> maxminddb.Reader:
    if not hasattr(os, "memfd_create"):  # not Linux: map the file itself (replace it by rename)
        return maxminddb.open_database(str(path))
    fd = os.memfd_create(f"mmdb:{path.name}", os.MFD_CLOEXEC)
    alias = f"/proc/self/fd/{fd}"
    try:
        with open(fd, "wb", closefd=False) as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        return maxminddb.open_database(alias)  # the reader's mapping keeps the copy alive
    except _LOOKUP_ERRORS as exc:  # name the operator's file, not our copy
        raise maxminddb.InvalidDatabaseError(str(exc).replace(alias, str(path))) from None
    finally:
        os.close(fd)


def _country(record: Record | None) -> tuple[str | None, str | None]:
    """ISO code and English name from ``country``, else ``registered_country`` (anycast, EU...)."""
    if not isinstance(record, dict):
        return None, None
    for key in ("country", "registered_country"):
        part = record.get(key)
        if not isinstance(part, dict):
            continue
        code = part.get("iso_code")
        if not (isinstance(code, str) and code.upper() in COUNTRY_CODES):
            continue  # geo_cache.country_code holds an ISO 3166-1 alpha-2 code
        code = code.upper()
        names = part.get("names")
        name = names.get("en") if isinstance(names, dict) else None
        return code, clean_text(name if isinstance(name, str) else None) or country_name(code)
    return None, None


def _asn(record: Record | None) -> tuple[str | None, str | None]:
    """GeoLite2-ASN and DB-IP Lite ASN share the field names."""
    if not isinstance(record, dict):
        return None, None
    number = record.get("autonomous_system_number")
    org = record.get("autonomous_system_organization")
    valid = isinstance(number, int) and not isinstance(number, bool) and 0 <= number < 2**32
    asn = f"AS{number}" if valid else None
    return asn, clean_text(org if isinstance(org, str) else None)


@lru_cache(maxsize=8192)
def _geo(code: str, name: str | None, asn: str | None, org: str | None) -> Geo:
    return Geo(code, name, asn, org, Resolution.RESOLVED, "mmdb")
