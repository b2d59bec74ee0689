"""``bangui-geo stats``, ``lookup`` and ``import-sqlite`` with ``GEO_DB_URL``: the same output as
from the SQLite file, the copy under the upsert rules, and one-line errors without the password."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from bangui_geo.testing.postgres import read_rows
from bangui_geo.testing.rows import LEGACY_ROWS, LEGACY_TABLE, T0, row
from services.persistence.ports import GeoRepository
from services.persistence.repository import SqliteGeoRepository
from services.persistence.repository_pg import PostgresGeoRepository
from shared.messages import GeoRow, Resolution, iso_utc
from tests.cli_runner import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_cli_env")]

ROWS = [
    row("203.0.113.7", "US", minutes=-3),
    row("198.51.100.1", "US", minutes=-9),
    row("2001:db8::1", "DE", minutes=-1, provider="mmdb"),
    row("10.0.0.1", None, resolution=Resolution.NOT_GLOBAL, provider=None),
    row("203.0.113.99", None),
]


def upsert(open_store: Callable[[], Awaitable[GeoRepository]], *batches: list[GeoRow]) -> None:
    async def apply() -> None:
        repo = await open_store()
        try:
            for batch in batches:
                await repo.upsert_many(batch)
        finally:
            await repo.close()

    asyncio.run(apply())


def unresolved(pg_url: str) -> list[str]:
    async def query() -> list[str]:
        repo = await PostgresGeoRepository.open(pg_url)
        try:
            return await repo.unresolved_ips()
        finally:
            await repo.close()

    return asyncio.run(query())


def test_stats_and_lookup_print_the_same_from_both_stores(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "geo.sqlite3"
    upsert(lambda: SqliteGeoRepository.open(path), ROWS)
    upsert(lambda: PostgresGeoRepository.open(pg_url), ROWS)
    outputs = {}
    for argv in (["stats"], ["stats", "--top", "1"], ["lookup", "::ffff:203.0.113.7", "8.8.8.8"]):
        from_sqlite = run(capsys, monkeypatch, {"GEO_DB_PATH": str(path)}, *argv)
        from_pg = run(capsys, monkeypatch, {"GEO_DB_URL": pg_url, "GEO_DB_PATH": "/nowhere"}, *argv)
        assert from_sqlite[0] == 0
        assert from_pg == from_sqlite, argv
        outputs[argv[-1]] = from_pg[1]
    assert "unresolved: 2 (failed 1, not_global 1)" in outputs["stats"]
    assert outputs["8.8.8.8"].splitlines()[-1].split(maxsplit=1) == ["8.8.8.8", "not in geo_cache"]
    # --db names a SQLite file, and wins over GEO_DB_URL
    explicit = run(capsys, monkeypatch, {"GEO_DB_URL": pg_url}, "stats", "--db", str(path))
    assert explicit == run(capsys, monkeypatch, {"GEO_DB_PATH": str(path)}, "stats")


def legacy_file(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as db:
        db.execute(LEGACY_TABLE)
        db.executemany("INSERT INTO geo_cache VALUES (?, ?, ?, ?, ?, ?)", LEGACY_ROWS)
        db.commit()
    return path


def test_import_copies_a_current_file_under_the_upsert_rules(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "geo.sqlite3"
    many = [row(f"11.0.{i // 250}.{i % 250}") for i in range(2500)]
    upsert(lambda: SqliteGeoRepository.open(path), [*ROWS, *many[:1000]], many[1000:])
    upsert(
        lambda: PostgresGeoRepository.open(pg_url),
        [
            row("203.0.113.7", "DE", minutes=30),  # newer than the file's: kept
            row("198.51.100.1", "DE", minutes=-60),  # older: replaced
            row("2001:db8::1", "US", minutes=-10),  # older: replaced
            row("203.0.113.99", "JP", minutes=-60),  # a known country the file's failure keeps
        ],
    )
    env = {"GEO_DB_URL": pg_url}
    code, out, err = run(capsys, monkeypatch, env, "import-sqlite", str(path))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"read 2505 rows from {path} (10 columns, bangui-geo table)"
    assert lines[1].startswith("wrote 3 batches to postgresql://postgres@127.0.0.1:5432/")
    assert (
        ": 2503 rows written (inserted, or replacing an answer as old or older), 2 kept" in lines[1]
    )
    stored = read_rows(pg_url)
    assert len(stored) == 2505
    assert stored["203.0.113.7"][0] == "DE"
    assert stored["198.51.100.1"][0] == "US"
    assert stored["2001:db8::1"][0] == "DE"
    assert stored["203.0.113.99"][0] == "JP"
    assert stored["10.0.0.1"][5] == "not_global"
    code, out, _ = run(capsys, monkeypatch, env, "import-sqlite", str(path))  # again: harmless
    assert code == 0
    assert read_rows(pg_url) == stored


def retention(pg_url: str) -> dict[str, tuple[str | None, str | None]]:
    with psycopg.connect(pg_url) as db:
        found = db.execute("SELECT ip, last_seen, failed_since FROM geo_cache").fetchall()
    return {ip: (seen, failed) for ip, seen, failed in found}


def test_import_carries_when_rows_were_last_seen_and_first_failed(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "geo.sqlite3"
    upsert(lambda: SqliteGeoRepository.open(path), ROWS)
    seen, later = iso_utc(T0 + timedelta(days=30)), iso_utc(T0 + timedelta(days=40))
    first_failed = iso_utc(T0 - timedelta(days=200))
    with closing(sqlite3.connect(path)) as db:
        db.executemany(
            "UPDATE geo_cache SET last_seen = ?, failed_since = ? WHERE ip = ?",
            [
                (seen, None, "203.0.113.7"),
                (seen, first_failed, "203.0.113.99"),
                (seen, None, "198.51.100.1"),
            ],
        )
        db.commit()
    upsert(lambda: PostgresGeoRepository.open(pg_url), [row("198.51.100.1", "US", minutes=-9)])
    with psycopg.connect(pg_url) as db:  # seen later than the file says
        db.execute("UPDATE geo_cache SET last_seen = %s WHERE ip = '198.51.100.1'", (later,))
    code, _, err = run(capsys, monkeypatch, {"GEO_DB_URL": pg_url}, "import-sqlite", str(path))
    assert (code, err) == (0, "")
    carried = retention(pg_url)
    assert carried["203.0.113.7"] == (seen, None)
    # A failed row keeps when it first failed, so the retry back-off treats it as old.
    assert carried["203.0.113.99"] == (seen, first_failed)
    assert carried["198.51.100.1"] == (later, None)  # the later kept
    assert carried["2001:db8::1"] == (None, None)  # nothing to carry: cached_at stands for both


def test_import_of_the_original_table_keeps_its_rows_retryable(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = legacy_file(tmp_path / "bangui.sqlite3")
    code, out, _ = run(capsys, monkeypatch, {"GEO_DB_URL": pg_url}, "import-sqlite", str(path))
    assert code == 0
    assert out.splitlines()[0] == f"read 2 rows from {path} (6 columns, original BanGUI table)"
    assert read_rows(pg_url) == {
        "8.8.8.8": ("US", "United States", "AS15169", "Google LLC", "2024-01-01 00:00", None, None),
        "9.9.9.9": (None, None, None, None, "2024-01-01 00:00", None, None),
    }
    assert unresolved(pg_url) == ["9.9.9.9"]


def test_bad_urls_and_files_are_one_line_without_the_password(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "pw-never-shown"
    missing_db = pg_url.rsplit("/", 1)[0].replace("postgres@", f"postgres:{secret}@") + "/geo_nodb"
    path = legacy_file(tmp_path / "bangui.sqlite3")
    for argv in (["stats"], ["lookup", "1.1.1.1"], ["import-sqlite", str(path)]):
        code, out, err = run(capsys, monkeypatch, {"GEO_DB_URL": missing_db}, *argv)
        assert (code, out) == (2, ""), argv
        assert err == (
            "bangui-geo: GEO_DB_URL: cannot use postgresql://postgres:***@127.0.0.1:5432/geo_nodb:"
            ' database "geo_nodb" does not exist\n'
        )
    code, _, err = run(capsys, monkeypatch, {}, "import-sqlite", str(path))
    assert (code, err) == (
        2,
        "bangui-geo: import-sqlite needs GEO_DB_URL (the PostgreSQL to fill)\n",
    )
    code, _, err = run(
        capsys, monkeypatch, {"GEO_DB_URL": pg_url}, "import-sqlite", str(tmp_path / "none.db")
    )
    assert code == 1
    assert "does not exist" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, monkeypatch, {"GEO_DB_URL": pg_url}, "stats")
    assert (code, err) == (1, f"bangui-geo: database {pg_url} has no geo_cache table\n")
