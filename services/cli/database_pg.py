"""``bangui-geo lookup`` and ``stats`` on PostgreSQL: the SQLite reader's queries, on a
read-only session, so both stores print the same tables.

The connection is wrapped to look like the sqlite3 one the queries were written for (``?``
placeholders, ``execute`` returning rows), so the queries exist once, in ``database.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.cli.errors import EXIT_USAGE, CliError
from services.persistence.pg_url import DatabaseUrlError, check_shape, driver_reason, redacted


class PostgresReader:
    """A read-only psycopg session with the sqlite3 ``execute`` shape the CLI's queries use."""

    def __init__(self, url: str) -> None:
        import psycopg  # the optional driver, needed only with GEO_DB_URL

        try:
            check_shape(url)
            self._db = psycopg.connect(url, connect_timeout=5, autocommit=True)
        except DatabaseUrlError as exc:
            raise CliError(f"GEO_DB_URL: {exc}", EXIT_USAGE) from None
        except psycopg.Error as exc:
            raise CliError(
                f"GEO_DB_URL: cannot use {redacted(url)}: {driver_reason(exc, url)}", EXIT_USAGE
            ) from None
        self._db.read_only = True
        try:
            self._db.execute("SELECT ip FROM geo_cache LIMIT 1")
        except psycopg.errors.UndefinedTable:
            self._db.close()
            raise CliError(f"database {redacted(url)} has no geo_cache table") from None

    def execute(self, query: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        return self._db.execute(query.replace("?", "%s"), params).fetchall()

    def close(self) -> None:
        self._db.close()
