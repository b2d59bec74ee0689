"""A PostgreSQL database per test on the server at ``GEO_TEST_PG_URL`` (``scripts/test`` sets
it and starts the local server): created empty, dropped afterwards, so tests never collide.

An unreachable server is a loud failure with the reason, never a skip. psycopg comes with the
``postgres`` (or ``test``) extra, not the runtime install: it is imported only when a database is
asked for, so importing this module does not need it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The test server trusts loopback connections and ignores a password: one given in GEO_DB_URL
# proves that no log line or error shows it.
TRUST_IGNORED_PASSWORD = "hunter2-geo"


class PostgresUnavailable(Exception):
    pass


def admin_url() -> str:
    return os.environ.get("GEO_TEST_PG_URL") or DEFAULT_ADMIN_URL


def with_password(url: str, password: str = TRUST_IGNORED_PASSWORD) -> str:
    """``url`` (user ``postgres``, no password) with ``password`` added."""
    return url.replace("postgres@", f"postgres:{password}@", 1)


def url_of(database: str, base: str | None = None) -> str:
    """``base`` (the admin URL) pointed at another database."""
    parts = urlsplit(base or admin_url())
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


@contextmanager
def fresh_database(server: str | None = None, prefix: str = "geo_test") -> Iterator[str]:
    """The URL of a new empty database on ``server`` (an admin URL; default GEO_TEST_PG_URL),
    dropped on exit (open connections are ended)."""
    import psycopg

    server = server or admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise PostgresUnavailable(
            f"PostgreSQL at {server} is not reachable: {exc} (scripts/test starts the local server)"
        ) from exc
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url_of(name, server)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def read_rows(url: str) -> dict[str, tuple[Any, ...]]:
    """ip -> (country_code, country_name, asn, org, cached_at, resolution, provider), as a
    reader on another connection sees them (committed rows only); {} before the table exists."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        try:
            found = db.execute(
                "SELECT ip, country_code, country_name, asn, org, cached_at, resolution, provider"
                " FROM geo_cache"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {r[0]: tuple(r[1:]) for r in found}
