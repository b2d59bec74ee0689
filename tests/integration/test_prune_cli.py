"""``bangui-geo prune --older-than AGE``: on a SQLite file and on PostgreSQL (``GEO_DB_URL``) it
counts the rows not seen for AGE, asks (or refuses without a terminal and ``--yes``), and
deletes exactly those; every error is one line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.cli import main as cli
from services.cli import prune
from services.persistence.ports import GeoRepository, Sightings
from services.persistence.repository import SqliteGeoRepository
from services.persistence.repository_pg import PostgresGeoRepository
from shared.messages import GeoRow, Resolution, iso_utc
from shared.settings import Settings
from tests.cli_runner import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_cli_env")]

NOW = datetime.now(UTC)


def aged(ip: str, days: float, code: str | None = "US") -> GeoRow:
    return GeoRow(
        ip=ip,
        resolution=Resolution.RESOLVED if code else Resolution.FAILED,
        cached_at=iso_utc(NOW - timedelta(days=days)),
        country_code=code,
        provider="embedded",
    )


OLD = [aged("203.0.113.1", 200), aged("203.0.113.2", 120), aged("203.0.113.3", 95, None)]
KEPT = [aged("198.51.100.1", 10), aged("198.51.100.2", 200)]  # .2 is seen 5 days ago


def fill(open_store: Callable[[], Awaitable[GeoRepository]]) -> None:
    async def apply() -> None:
        repo = await open_store()
        try:
            await repo.upsert_many(sorted(OLD + KEPT))
            seen = Sightings(["198.51.100.2"], iso_utc(NOW - timedelta(days=5)))
            await repo.upsert_many([], seen=seen)
        finally:
            await repo.close()

    asyncio.run(apply())


def ips(open_store: Callable[[], Awaitable[GeoRepository]]) -> set[str]:
    async def query() -> set[str]:
        repo = await open_store()
        try:
            known = {r.ip for r in await repo.known_rows([r.ip for r in OLD + KEPT])}
            return known | set(await repo.unresolved_ips())
        finally:
            await repo.close()

    return asyncio.run(query())


@pytest.fixture(params=["sqlite", "postgres"])
def target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[dict[str, str], Callable[[], Awaitable[GeoRepository]]]:
    if request.param == "sqlite":
        path = tmp_path / "geo.sqlite3"
        return {"GEO_DB_PATH": str(path)}, lambda: SqliteGeoRepository.open(path)
    url = request.getfixturevalue("pg_url")
    return {"GEO_DB_URL": url, "GEO_DB_PATH": "/nowhere"}, lambda: PostgresGeoRepository.open(url)


def test_prune_deletes_the_rows_not_seen_for_the_age(
    target: tuple[dict[str, str], Callable[[], Awaitable[GeoRepository]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env, open_store = target
    fill(open_store)
    code, out, err = run(capsys, monkeypatch, env, "prune", "--older-than", "90d")
    assert code == 2  # no terminal under pytest, no --yes: refused, nothing deleted
    assert out == ""
    assert err.startswith("bangui-geo: delete 3 rows of geo_cache not seen for 90d (since ")
    assert "pass --yes to confirm (stdin is not a terminal); nothing was deleted" in err
    assert ips(open_store) == {r.ip for r in OLD + KEPT}
    code, out, err = run(capsys, monkeypatch, env, "prune", "--older-than", "90d", "--yes")
    assert (code, err) == (0, "")
    assert out.startswith("deleted 3 rows of geo_cache last seen before ")
    assert ips(open_store) == {r.ip for r in KEPT}
    code, out, _ = run(capsys, monkeypatch, env, "prune", "--older-than", "90d", "--yes")
    assert code == 0
    assert "nothing to delete" in out


def test_prune_asks_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "geo.sqlite3"
    fill(lambda: SqliteGeoRepository.open(path))
    settings = Settings(db_path=path)
    asked: list[str] = []

    def answer(reply: str) -> Callable[[str], str]:
        def ask(question: str) -> str:
            asked.append(question)
            return reply

        return ask

    said = asyncio.run(
        prune.prune(settings, timedelta(days=90), yes=False, interactive=True, ask=answer("n"))
    )
    assert said == "nothing was deleted"
    assert asked[0].startswith("delete 3 rows of geo_cache not seen for 90d (since ")
    assert asked[0].endswith("? [y/N] ")
    said = asyncio.run(
        prune.prune(settings, timedelta(days=90), yes=False, interactive=True, ask=answer("y"))
    )
    assert said.startswith("deleted 3 rows")


def test_prune_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "none.sqlite3"
    code, _, err = run(capsys, monkeypatch, {}, "prune", "--older-than", "7d", "--db", str(missing))
    assert code == 1
    assert err == (
        f"bangui-geo: database {missing} does not exist"
        " (set GEO_DB_PATH or --db; persistence creates it)\n"
    )
    assert not missing.exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["prune", "--older-than", "soon"])
    assert info.value.code == 2
    assert "'soon' is not an age like 30m, 12h or 7d" in capsys.readouterr().err
