"""Which ``geo_cache`` store a process uses: PostgreSQL when ``GEO_DB_URL`` is set, else the
SQLite file at ``GEO_DB_PATH``. The one place that names both implementations.

The PostgreSQL driver is imported only when it is used, so a SQLite install needs no extra.
"""

from __future__ import annotations

from services.persistence.pg_url import DatabaseUrlError, check_reachable, redacted
from services.persistence.ports import GeoRepository
from services.persistence.repository import SqliteGeoRepository
from shared.settings import Settings, SettingsError


def db_url(settings: Settings) -> str | None:
    return None if settings.db_url is None else settings.db_url.get_secret_value()


def describe(settings: Settings) -> dict[str, str]:
    """Log fields naming the store (the password redacted)."""
    url = db_url(settings)
    if url is None:
        return {"store": "sqlite", "db_path": str(settings.db_path)}
    return {"store": "postgres", "db": redacted(url)}


def check_database(settings: Settings) -> None:
    """Start check: ``GEO_DB_URL``, when set, names a database we can connect to."""
    url = db_url(settings)
    if url is None:
        return
    try:
        check_reachable(url)
    except DatabaseUrlError as exc:
        raise SettingsError(f"GEO_DB_URL: {exc}") from None


async def open_repository(settings: Settings) -> GeoRepository:
    url = db_url(settings)
    if url is None:
        return await SqliteGeoRepository.open(settings.db_path)
    from services.persistence.repository_pg import PostgresGeoRepository

    return await PostgresGeoRepository.open(url)
