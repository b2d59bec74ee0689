"""The one settings class of every service, read from ``GEO_*`` environment variables.

The variable names are a public contract (README, docker-compose.yml); ``load_settings`` turns a
bad value into one line that names the variable, so a misconfigured service stops at start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from shared.redaction import redact, redact_url

KNOWN_PROVIDERS = frozenset({"embedded", "ip-api", "mmdb"})
# A comma separates two broker URLs only where the next one begins (a scheme and ://), so a comma
# inside a password, which a URL allows unencoded, keeps a single URL whole.
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
# What a URL's user name and password may hold unencoded (RFC 3986 userinfo, plus the "@" that
# urlsplit and aio-pika already read as part of the password, as they do today).
_USERINFO = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:@]*")
PERCENT_ENCODING_HINT = (
    "percent-encode reserved characters in the user name and password "
    "(/ as %2F, # as %23, ? as %3F, % as %25, a space as %20)"
)


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """The broker URLs of ``GEO_AMQP_URL``: one, or several nodes of a cluster, comma-separated."""
    return tuple(part.strip() for part in _NEXT_URL.split(value))


class SettingsError(Exception):
    """A ``GEO_*`` variable has a value the services cannot run with; the message is printed as
    is, so any credential in it is masked here."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be read as the broker URL it was meant to be, or None when it can.

    A password with an unencoded ``/``, ``?`` or ``#`` ends the host part early: the rest turns
    into a port that is no number, or into a path, query or fragment holding the ``@``. The
    reasons never quote the URL (they are printed; the caller shows it redacted).
    """
    if re.search(r"\s", url):
        return "it contains white space"
    authority_and_rest = url.partition("://")[2]
    authority = re.split(r"[/?#]", authority_and_rest, maxsplit=1)[0]
    if "@" in authority_and_rest[len(authority) :]:
        return "an unencoded /, ? or # in the user name or password ends the host part early"
    userinfo, at, _ = authority.rpartition("@")
    if at and not _USERINFO.fullmatch(userinfo):
        return "the user name or password holds a character that must be percent-encoded"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (reading it is the check: urlsplit parses the port lazily)
        host = URL(url).host  # what aio-pika reads the URL with
    except ValueError:
        return "the port is not a number from 0 to 65535"
    if not parts.hostname or not host:
        return "it names no host"
    return None


MIN_INTERVAL = 0.05  # seconds: twenty commands a second at most


class Settings(BaseSettings):
    # No inf or nan anywhere: GEO_FLUSH_INTERVAL=inf would never flush (and log "Infinity").
    model_config = SettingsConfigDict(
        env_prefix="GEO_", extra="ignore", frozen=True, allow_inf_nan=False
    )

    amqp_url: str = Field(
        default="amqp://guest:guest@localhost:5672/",
        description="Broker URL, or a comma-separated list of cluster nodes' URLs tried in turn; "
        "the vhost comes from its path.",
    )
    db_path: Path = Field(
        default=Path("data/geo_cache.sqlite3"),
        description="SQLite file holding geo_cache; its parent folder is created.",
    )
    db_url: SecretStr | None = Field(
        default=None,
        description="postgresql:// URL: geo_cache in PostgreSQL instead of GEO_DB_PATH.",
    )
    # Bounded both ways: 0.001 s would be a thousand commands a second, and a day is past any
    # sensible cadence (the broker's consumer_timeout ends a delivery held 30 min).
    flush_interval: float = Field(
        default=60.0, ge=MIN_INTERVAL, le=86_400, description="Seconds between geo.flush."
    )
    re_resolve_interval: float = Field(
        default=600.0,
        ge=MIN_INTERVAL,
        le=7 * 86_400,
        description="Seconds between geo.re_resolve.",
    )
    provider: str = Field(
        default="embedded",
        description="Provider or comma-separated chain of embedded, ip-api, mmdb.",
    )
    ipapi_url: str = Field(default="http://ip-api.com", description="ip-api base URL.")
    ipapi_requests_per_window: int = Field(
        default=15, ge=1, description="ip-api batch requests allowed per window (documented: 15)."
    )
    ipapi_window: float = Field(
        default=60.0, gt=0, description="Seconds of ip-api's rate window (documented: 60)."
    )
    ipapi_timeout: float = Field(default=10.0, gt=0, description="Seconds per ip-api request.")
    ipapi_max_wait: float = Field(
        default=300.0, gt=0, description="Seconds an IP may queue for ip-api before it fails."
    )
    mmdb_path: Path | None = Field(default=None, description="Country or City .mmdb file.")
    mmdb_asn_path: Path | None = Field(default=None, description="Optional ASN .mmdb file.")
    cache_max_entries: int = Field(default=500_000, ge=1, description="Resolver cache bound.")
    negative_ttl: float = Field(
        default=300.0, ge=0, description="Seconds a failed lookup is not retried on ip.seen."
    )
    prefetch: int = Field(
        default=2000, ge=2, le=65535, description="Unacked ip.seen deliveries the resolver holds."
    )
    flush_max_dirty: int = Field(
        default=20_000, ge=1, description="Dirty entries that trigger an early flush."
    )
    drain_timeout: float = Field(
        default=5.0, ge=0, le=8.0, description="Seconds to wait for in-flight work on shutdown."
    )
    max_message_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger bodies go to geo.dead_letter."
    )
    publish_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait for a confirm.")
    known_timeout: float = Field(
        default=2.0, gt=0, le=30, description="Seconds the resolver waits for geo.known."
    )
    max_age: float = Field(
        default=30 * 86400.0, ge=0, description="Seconds before a resolved row is refreshed."
    )
    refresh_per_tick: int = Field(
        default=1000, ge=0, description="Resolved rows refreshed per re-resolve tick, at most."
    )
    publish_resolved: bool = Field(
        default=True, description="Publish ip.resolved events after each flush."
    )
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic", description="quorum for replicated queues on a RabbitMQ cluster."
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics and /health here; unset: off."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address /metrics binds to.")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        urls = split_amqp_urls(value)
        bad = [url for url in urls if not url.startswith(("amqp://", "amqps://"))]
        if len(urls) == 1 and bad:
            raise ValueError("must start with amqp:// or amqps://")
        if bad:
            raise ValueError("each URL of the list must start with amqp:// or amqps://")
        for index, url in enumerate(urls):
            problem = url_problem(url)
            if problem is not None:
                which = "" if len(urls) == 1 else f" (URL {index + 1} of the list)"
                raise ValueError(
                    f"cannot be parsed as a URL{which}: {problem}; {PERCENT_ENCODING_HINT}"
                )
        return value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        chain = [part.strip() for part in value.split(",")]
        unknown = [name for name in chain if name not in KNOWN_PROVIDERS]
        if not value.strip() or unknown:
            raise ValueError(
                f"unknown provider {', '.join(unknown) or repr(value)}; "
                f"choose from {', '.join(sorted(KNOWN_PROVIDERS))}"
            )
        return ",".join(chain)

    @field_validator("mmdb_path", "mmdb_asn_path", "metrics_port", "db_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # compose's ${VAR:-} gives an empty string

    @field_validator("ipapi_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _mmdb_needs_path(self) -> Settings:
        if "mmdb" not in self.provider_chain:
            return self
        if self.mmdb_path is None:
            raise ValueError("GEO_MMDB_PATH is required when GEO_PROVIDER includes mmdb")
        return self

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        return split_amqp_urls(self.amqp_url)

    @property
    def provider_chain(self) -> tuple[str, ...]:
        return tuple(self.provider.split(","))


def load_settings() -> Settings:
    """Read the environment; raise ``SettingsError`` naming the first bad variable."""
    secrets = Path(os.environ.get("GEO_SECRETS_DIR", "/run/secrets"))
    try:
        # Secret files (docker/compose secrets) named like the variable, e.g. geo_amqp_url,
        # keep credentials out of the environment; the environment still wins.
        return Settings(_secrets_dir=secrets) if secrets.is_dir() else Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across variables names its variable itself
            raise SettingsError(message) from None
        field = str(error["loc"][0])
        value = error.get("input")
        shown = repr(redact_url(value) if isinstance(value, str) else value)
        raise SettingsError(f"GEO_{field.upper()}: {message} (got {shown})") from None
