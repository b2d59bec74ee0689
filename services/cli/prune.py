"""``bangui-geo prune --older-than AGE [--yes]``: delete the ``geo_cache`` rows no one has seen
for that long (``last_seen``, else ``cached_at``), on SQLite or PostgreSQL (``GEO_DB_URL``).

Safe beside a running persistence: the rows go in chunks, one short transaction each (SQLite:
WAL, the writer waits for a chunk within its busy timeout), and each chunk checks the condition
again, so a row seen or rewritten meanwhile stays. It counts first and asks, as
``dead-letters purge`` does; ``--yes`` skips the question, and without a terminal it is needed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.cli.durations import format_age
from services.cli.errors import EXIT_USAGE, CliError
from services.persistence.pg_url import DatabaseUrlError, check_reachable
from services.persistence.ports import GeoRepository
from shared.errors import Transient
from shared.messages import iso_utc
from shared.settings import Settings

CHUNK_ROWS = 2000  # rows per DELETE: a few milliseconds of write lock each
# last_seen is written once a day (a row seen a minute ago may say it was seen at midnight), so
# a shorter AGE would delete rows of IPs seen today; "0d" would delete every row.
MIN_AGE = timedelta(days=1)


def cutoff(now: datetime, older_than: timedelta) -> str:
    try:
        return iso_utc(now - older_than)
    except OverflowError:  # before year 1: no row is older than that
        return iso_utc(datetime.min.replace(tzinfo=UTC))


def question(count: int, older_than: timedelta, before: str) -> str:
    rows = f"{count:,} row{'s' if count != 1 else ''}"
    return f"delete {rows} of geo_cache not seen for {format_age(older_than)} (since {before})?"


async def open_store(settings: Settings) -> GeoRepository:
    """The writer's repository for the configured store (created or migrated, as at start)."""
    if settings.db_url is None:
        from services.persistence.repository import SqliteGeoRepository

        path = settings.db_path
        if not path.is_file():
            raise CliError(
                f"database {path} does not exist (set GEO_DB_PATH or --db; persistence creates it)"
            )
        try:
            return await SqliteGeoRepository.open(path)
        except sqlite3.Error as exc:
            raise CliError(f"cannot open database {path}: {exc}") from None
    from services.persistence.repository_pg import PostgresGeoRepository

    url = settings.db_url.get_secret_value()
    try:
        check_reachable(url)
    except DatabaseUrlError as exc:
        raise CliError(f"GEO_DB_URL: {exc}", EXIT_USAGE) from None
    return await PostgresGeoRepository.open(url)


async def prune(
    settings: Settings,
    older_than: timedelta,
    *,
    yes: bool,
    interactive: bool,
    ask: Callable[[str], str] = input,
    now: datetime | None = None,
) -> str:
    """The command; returns the line to print."""
    before = cutoff(now or datetime.now(UTC), older_than)
    repository = await open_store(settings)
    try:
        count = await repository.count_unseen(before)
        if count == 0:
            return f"no row of geo_cache was last seen before {before}; nothing to delete"
        if not yes:
            text = question(count, older_than, before)
            if not interactive:
                raise CliError(
                    f"{text} pass --yes to confirm (stdin is not a terminal); nothing was deleted",
                    EXIT_USAGE,
                )
            answer = await asyncio.to_thread(ask, text + " [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                return "nothing was deleted"
        deleted = await repository.prune(before, CHUNK_ROWS)
    except (sqlite3.Error, Transient) as exc:
        raise CliError(f"prune failed: {exc} (running it again is safe)") from None
    finally:
        await repository.close()
    return f"deleted {deleted:,} rows of geo_cache last seen before {before}"


def run(settings: Settings, older_than: timedelta, *, yes: bool) -> None:
    print(asyncio.run(prune(settings, older_than, yes=yes, interactive=sys.stdin.isatty())))
