"""``GEO_DB_URL``: its shape, its redacted form for logs and errors, and the start check.

The URL carries a password, so nothing outside this module prints it: every message names the
database by ``redacted(url)`` and scrubs the password from driver errors too. The start check
runs before the event loop, so a wrong URL, password or database name stops persistence (and the
CLI) with one line and exit 2, as a bad setting does.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_S = 5
_QUERY_SECRETS = frozenset({"password", "sslpassword"})


class DatabaseUrlError(Exception):
    """``GEO_DB_URL`` is malformed or names a database that can't be used; message redacted."""


def redacted(url: str) -> str:
    """``url`` with its password (in the user part or the query) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, sep, _password = user.partition(":")
        netloc = f"{name}:***@{host}" if sep else f"{user}@{host}"
    query = [
        (key, "***" if key in _QUERY_SECRETS else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*/"), ""))


def secrets_of(url: str) -> list[str]:
    """The password spellings that may appear in a driver's message, longest first."""
    parts = urlsplit(url)
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    found += [v for k, v in parse_qsl(parts.query) if k in _QUERY_SECRETS and v]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """A driver message on one line, with no password in it."""
    for secret in secrets_of(url):
        text = text.replace(secret, "***")
    return re.sub(r"\s+", " ", text).strip()


def check_shape(url: str) -> None:
    if not url.startswith(SCHEMES):
        raise DatabaseUrlError(f"must start with postgresql:// (got {redacted(url)!r})")
    if not urlsplit(url).path.strip("/"):
        raise DatabaseUrlError(f"names no database (got {redacted(url)!r})")


def driver_reason(exc: BaseException, url: str) -> str:
    """The useful part of a psycopg connection error: the server's FATAL line, if any."""
    text = str(exc) or repr(exc)
    fatal = re.findall(r"FATAL:\s*(.+)", text)
    return scrub(fatal[-1] if fatal else text.removeprefix("connection failed: "), url)


def check_reachable(url: str) -> None:
    """Connect once and run a query; raise ``DatabaseUrlError`` saying why not."""
    check_shape(url)
    try:
        import psycopg
    except ImportError:
        raise DatabaseUrlError(
            "needs the PostgreSQL driver: pip install 'bangui-geo[postgres]'"
        ) from None
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as db:
            db.execute("SELECT 1")
    except psycopg.Error as exc:
        raise DatabaseUrlError(f"cannot use {redacted(url)}: {driver_reason(exc, url)}") from None
