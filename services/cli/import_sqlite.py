"""``bangui-geo import-sqlite FILE``: copy a SQLite ``geo_cache`` into PostgreSQL (``GEO_DB_URL``).

For moving from the default store, or from the original BanGUI's table (six columns, no
``resolution`` or ``provider``: those stay NULL, so its unresolved rows are retried as on
SQLite). Rows go through the PostgreSQL repository in batches of ``BATCH_ROWS``, one transaction
each, under the same rules as ``geo.upsert``: an older or failed answer never replaces a newer or
known one, so running it twice, or beside a running persistence, is harmless. A bangui-geo file's
``last_seen`` and ``failed_since`` come along (the later sighting, the earlier first failure), so
retention and the retry back-off see the copied rows as the file did.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from services.cli.database import open_read_only
from services.cli.errors import EXIT_USAGE, CliError
from services.persistence.pg_url import DatabaseUrlError, check_reachable, redacted
from shared.errors import Transient
from shared.messages import GeoRow, Resolution
from shared.settings import Settings

BATCH_ROWS = 1000
ORIGINAL_COLUMNS = ("ip", "country_code", "country_name", "asn", "org", "cached_at")
RETENTION_COLUMNS = ("last_seen", "failed_since")


@dataclass
class ImportCounts:
    source_columns: int = 0
    read: int = 0
    changed: int = 0
    batches: int = 0

    @property
    def kept(self) -> int:
        """Rows where PostgreSQL already held a newer answer or a known country."""
        return self.read - self.changed


def source_rows(db: sqlite3.Connection) -> tuple[int, sqlite3.Cursor]:
    """The number of columns of the file's table and a cursor over its rows in ``GeoRow``
    order, then ``RETENTION_COLUMNS``; what the file's table lacks (``resolution`` and
    ``provider`` of the original table, the retention columns of an older bangui-geo) reads as
    NULL."""
    present = {str(c[1]) for c in db.execute("PRAGMA table_info(geo_cache)")}
    missing = [c for c in ORIGINAL_COLUMNS if c not in present]
    if missing:
        raise CliError(f"geo_cache in that file lacks the column(s) {', '.join(missing)}")
    names = (*GeoRow._fields, *RETENTION_COLUMNS)
    wanted = [c if c in present else f"NULL AS {c}" for c in names]
    return len(present), db.execute(f"SELECT {', '.join(wanted)} FROM geo_cache ORDER BY ip")


def as_row(values: tuple[object, ...]) -> GeoRow:
    text = [_text(v) for v in values]
    # resolution stays as stored: NULL (the original table) is what re-resolve retries.
    return GeoRow(text[0] or "", cast(Resolution, text[1]), *text[2:])  # type: ignore[arg-type]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


async def import_sqlite(path: Path, url: str) -> ImportCounts:
    from services.persistence.repository_pg import PostgresGeoRepository

    counts = ImportCounts()
    with closing(open_read_only(path)) as db:
        counts.source_columns, cursor = source_rows(db)
        repository = await PostgresGeoRepository.open(url)
        try:
            width = len(GeoRow._fields)
            while batch := cursor.fetchmany(BATCH_ROWS):
                counts.changed += await repository.upsert_many([as_row(v[:width]) for v in batch])
                await repository.carry_retention(
                    [(str(v[0]), _text(v[width]), _text(v[width + 1])) for v in batch]
                )
                counts.read += len(batch)
                counts.batches += 1
        except Transient as exc:
            raise CliError(
                f"{exc} (after {counts.read} rows; running the import again is safe)"
            ) from None
        finally:
            await repository.close()
    return counts


def render(counts: ImportCounts, path: Path, url: str) -> str:
    kind = "original BanGUI table" if counts.source_columns == 6 else "bangui-geo table"
    return (
        f"read {counts.read} rows from {path} ({counts.source_columns} columns, {kind})\n"
        f"wrote {counts.batches} batches to {redacted(url)}: {counts.changed} rows written"
        f" (inserted, or replacing an answer as old or older), {counts.kept} kept (a newer"
        " answer or a known country was there)"
    )


def run(path: Path, settings: Settings) -> None:
    """The command: check ``GEO_DB_URL`` (one line, exit 2), copy, print the counts."""
    if settings.db_url is None:
        raise CliError("import-sqlite needs GEO_DB_URL (the PostgreSQL to fill)", EXIT_USAGE)
    url = settings.db_url.get_secret_value()
    try:
        check_reachable(url)
    except DatabaseUrlError as exc:
        raise CliError(f"GEO_DB_URL: {exc}", EXIT_USAGE) from None
    counts = asyncio.run(import_sqlite(path, url))
    print(render(counts, path, url))
