"""``bangui-geo lookup`` and ``stats``: read ``geo_cache`` read-only, beside the running writer.

The file is opened with SQLite's ``mode=ro`` URI, so the CLI never creates, migrates or writes
it (like any reader of a WAL database, SQLite may add its ``-wal``/``-shm`` companions); WAL mode
lets it read while persistence writes. With ``GEO_DB_URL`` the same queries run on PostgreSQL
(``database_pg.py``). Queries are apart from the rendering, tested on a small file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from services.cli.errors import CliError
from services.cli.table import render_table, thousands
from shared.settings import Settings

LOOKUP_COLUMNS = (
    "ip",
    "country_code",
    "country_name",
    "asn",
    "org",
    "resolution",
    "provider",
    "cached_at",
)
NOT_FOUND = "not in geo_cache"


class Reader(Protocol):
    """What the queries need: sqlite3's connection, or ``database_pg.PostgresReader``."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Iterable[Any]: ...

    def close(self) -> None: ...


def open_reader(settings: Settings) -> Reader:
    """PostgreSQL when ``GEO_DB_URL`` is set, else the SQLite file, read-only either way."""
    if settings.db_url is None:
        return open_read_only(settings.db_path)
    from services.cli.database_pg import PostgresReader

    return PostgresReader(settings.db_url.get_secret_value())


def open_read_only(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-only, or raise ``CliError`` saying what is missing."""
    if not path.is_file():
        raise CliError(
            f"database {path} does not exist (set GEO_DB_PATH or --db; persistence creates it)"
        )
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise CliError(f"cannot open database {path}: {exc}") from None
    try:
        db.execute("SELECT ip FROM geo_cache LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        db.close()
        if "no such table" in str(exc):
            raise CliError(f"database {path} has no geo_cache table") from None
        raise CliError(f"cannot read database {path}: {exc}") from None
    return db


def lookup(db: Reader, ips: Sequence[str]) -> dict[str, tuple[str | None, ...]]:
    """The rows of ``ips`` (normalized addresses) that exist, keyed by address."""
    found: dict[str, tuple[str | None, ...]] = {}
    query = f"SELECT {', '.join(LOOKUP_COLUMNS)} FROM geo_cache WHERE ip = ?"
    for ip in dict.fromkeys(ips):
        for row in db.execute(query, (ip,)):
            found[ip] = tuple(None if value is None else str(value) for value in row)
    return found


def render_lookup(ips: Sequence[str], found: dict[str, tuple[str | None, ...]]) -> str:
    headers = ("ip", "country", "name", "asn", "org", "resolution", "provider", "cached_at")
    rows: list[list[str]] = []
    for ip in dict.fromkeys(ips):
        row = found.get(ip)
        rows.append([ip, NOT_FOUND] if row is None else [value or "-" for value in row])
    return render_table(headers, rows)


@dataclass(frozen=True)
class Stats:
    by_country: list[tuple[str, str | None, int]]  # code, name, rows; most rows first
    unresolved: dict[str, int]  # resolution ("legacy" for NULL) -> rows without a country
    newest: str | None  # cached_at of the newest row

    @property
    def resolved_total(self) -> int:
        return sum(count for _, _, count in self.by_country)

    @property
    def unresolved_total(self) -> int:
        return sum(self.unresolved.values())


def read_stats(db: Reader) -> Stats:
    by_country = [
        (str(code), None if name is None else str(name), int(count))
        for code, name, count in db.execute(
            "SELECT country_code, MAX(country_name), COUNT(*) FROM geo_cache"
            " WHERE country_code IS NOT NULL GROUP BY country_code"
            " ORDER BY COUNT(*) DESC, country_code"
        )
    ]
    unresolved = {
        str(resolution or "legacy"): int(count)
        for resolution, count in db.execute(
            "SELECT resolution, COUNT(*) FROM geo_cache WHERE country_code IS NULL"
            " GROUP BY resolution ORDER BY COUNT(*) DESC, resolution"
        )
    }
    ((newest,),) = db.execute("SELECT MAX(cached_at) FROM geo_cache")
    return Stats(by_country, unresolved, None if newest is None else str(newest))


def age(cached_at: str, now: datetime) -> str | None:
    """How long ago ``cached_at`` (ISO-8601) was, e.g. ``42 s``, ``5 min``, ``3 h``, ``2 d``."""
    try:
        moment = datetime.fromisoformat(cached_at)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = max(0.0, (now - moment).total_seconds())
    for unit, size, below in (("s", 1, 90), ("min", 60, 90 * 60), ("h", 3600, 36 * 3600)):
        if seconds < below:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds / 86400:.0f} d"


def render_stats(stats: Stats, now: datetime, *, top: int | None = None) -> str:
    total = stats.resolved_total + stats.unresolved_total
    if total == 0:
        return "geo_cache is empty"

    def share(count: int) -> str:
        return f"{100 * count / total:.1f}%"

    shown = stats.by_country if top is None else stats.by_country[:top]
    rows = [[code, name or "-", thousands(count), share(count)] for code, name, count in shown]
    others = stats.by_country[len(shown) :]
    if others:
        count = sum(c for _, _, c in others)
        rows.append(["..", f"{len(others)} other countries", thousands(count), share(count)])
    unresolved = stats.unresolved_total
    detail = ", ".join(f"{kind} {thousands(n)}" for kind, n in stats.unresolved.items())
    rows.append(["--", "unresolved", thousands(unresolved), share(unresolved)])
    rows.append(["", "total", thousands(total), "100.0%"])
    lines = [render_table(("cc", "country", "IPs", "share"), rows, right=(2, 3))]
    lines.append(f"unresolved: {thousands(unresolved)}" + (f" ({detail})" if detail else ""))
    if stats.newest is not None:
        ago = age(stats.newest, now)
        lines.append(f"newest row: {stats.newest}" + (f" ({ago} ago)" if ago else ""))
    return "\n".join(lines)
