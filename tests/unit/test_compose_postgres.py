"""The compose ``postgres`` profile: a PostgreSQL server that only the profile starts, and
persistence pointed at it by deploy/postgres/postgres.env (and at SQLite without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.settings import Settings
from tests.compose_files import environment_of, interpolated, read_env_file

POSTGRES_ENV = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "postgres.env"


def test_the_profile_points_persistence_at_its_server(raw_compose: dict[str, Any]) -> None:
    compose = interpolated(raw_compose, read_env_file(POSTGRES_ENV))
    server = compose["services"]["postgres"]
    assert server["profiles"] == ["postgres"]
    assert server["image"].startswith("postgres:")
    assert "pg_isready" in server["healthcheck"]["test"]
    db = environment_of(server)
    persistence = compose["services"]["persistence"]
    assert persistence["depends_on"]["postgres"] == {
        "condition": "service_healthy",
        "required": False,
    }
    settings = Settings(db_url=environment_of(persistence)["GEO_DB_URL"])
    url = settings.db_url
    assert url is not None
    assert db["POSTGRES_PASSWORD"] not in repr(settings)  # a secret, not printed
    parts = urlsplit(url.get_secret_value())
    assert (parts.hostname, parts.port) == ("postgres", 5432)
    assert (parts.username, parts.password) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"])
    assert parts.path == f"/{db['POSTGRES_DB']}"


def test_without_the_env_file_persistence_keeps_sqlite(raw_compose: dict[str, Any]) -> None:
    compose = interpolated(raw_compose, {})
    env = environment_of(compose["services"]["persistence"])
    assert Settings(db_url=env["GEO_DB_URL"]).db_url is None
    assert env["GEO_DB_PATH"] == "/data/geo_cache.sqlite3"
