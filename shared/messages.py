"""Message bodies on the ``bangui`` exchange, as frozen pydantic models validated at the edge.

Events are past-tense facts (``IpSeen``); commands are imperatives (``FlushDirty``,
``ReResolveStale``, ``RetryUnresolved``, ``GeoUpsertBatch``). The field descriptions are the
contract text; ``tests/unit/test_messages.py`` snapshots the JSON schema so changes show in review.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import JsonDict

from shared.ipnorm import normalize_ip
from shared.ipschema import IP_JSON_SCHEMA

MAX_IPS_PER_MESSAGE = 1000
MAX_ROWS_PER_UPSERT = 1000

Ip = Annotated[StrictStr, AfterValidator(normalize_ip), WithJsonSchema(IP_JSON_SCHEMA)]

# What the "exactly one" validator enforces, said in the schema for other components' validators.
EXACTLY_ONE_ADDRESS_FIELD: JsonDict = {
    "oneOf": [
        {"required": ["ip"], "properties": {"ip": {"type": "string"}, "ips": {"type": "null"}}},
        {"required": ["ips"], "properties": {"ips": {"type": "array"}, "ip": {"type": "null"}}},
    ]
}


class IpSeen(BaseModel):
    """Event ``ip.seen``: a BanGUI component saw these addresses (e.g. fail2ban banned them).

    Exactly one of ``ip`` or ``ips``. Other fields (``source``, ``jail``, ``seen_at``, ...) are
    allowed and ignored, so publishers can add context without breaking us.
    """

    model_config = ConfigDict(
        extra="ignore", frozen=True, json_schema_extra=EXACTLY_ONE_ADDRESS_FIELD
    )

    ip: Ip | None = Field(
        default=None, description="One IPv4 or IPv6 address.", examples=["8.8.8.8"]
    )
    ips: list[Ip] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_IPS_PER_MESSAGE,
        description="1 to 1000 IPv4 or IPv6 addresses.",
        examples=[["1.1.1.1", "2001:db8::1"]],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> IpSeen:
        if (self.ip is None) == (self.ips is None):
            raise ValueError("exactly one of 'ip' or 'ips' is required")
        return self

    @property
    def addresses(self) -> list[str]:
        """The normalized addresses, in order, duplicates kept."""
        return [self.ip] if self.ip is not None else list(self.ips or ())


class FlushDirty(BaseModel):
    """Command ``geo.flush``: publish every unpersisted cache entry to persistence now."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tick_id: str = Field(description="Unique per tick, e.g. 'flush:1763812800.000'.")
    issued_at: datetime = Field(description="When the timer sent it (UTC).")


class ReResolveStale(BaseModel):
    """Command ``geo.re_resolve``: find the unresolved, routable rows and have them retried."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tick_id: str = Field(description="Unique per tick, e.g. 're_resolve:1763813400.000'.")
    issued_at: datetime = Field(description="When the timer sent it (UTC).")


class RetryUnresolved(BaseModel):
    """Command ``geo.retry`` (persistence to resolver): look these IPs up again, ignoring the
    negative cache; the answers reach ``geo_cache`` with the next flush."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tick_id: str = Field(description="The re_resolve tick that asked for the retry.")
    ips: list[Ip] = Field(min_length=1, max_length=MAX_IPS_PER_MESSAGE)
    refresh: bool = Field(
        default=False,
        description="Resolved rows older than GEO_MAX_AGE: look them up although they are "
        "answered; a failed lookup keeps the old answer.",
    )


class Resolution(StrEnum):
    """Why a row has (or lacks) a country; decides whether re-resolve retries it."""

    RESOLVED = "resolved"
    FAILED = "failed"  # lookup failed or no provider knew it: retried by re-resolve
    NOT_GLOBAL = "not_global"  # private, loopback, reserved...: never looked up, never retried
    REJECTED = "rejected"  # a provider's final "no" (e.g. ip-api 'reserved range'): not retried


# A real moment, checked by pydantic-core's regex (no Python call per row): each month's length,
# and February 29th only in a leap year.
_MONTH_DAY = (
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = rf"(?:[0-9]{{4}}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
IsoUtc = Annotated[
    str,
    StringConstraints(
        strict=True,
        pattern=rf"^{_DATE}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{{6}}Z$",
    ),
]


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with a fixed width (microseconds always), so text order is time order."""
    if moment.utcoffset() != _ZERO:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def iso_utc_from_epoch(seconds: float) -> str:
    """``iso_utc`` of a ``time.time()`` value, without building a datetime per row."""
    whole = int(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_utc_second(whole)}.{micros:06d}Z"


@lru_cache(maxsize=1024)
def _utc_second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


_ZERO = timedelta(0)

# Every assigned ISO 3166-1 alpha-2 code (pycountry's list: tests/unit/test_messages.py keeps the
# two equal), plus the three the RIR registration data (and so the embedded provider, MaxMind
# and ip-api) also use: EU and AP for blocks registered to a region, XK for Kosovo. Written out
# so that importing the messages does not load pycountry's database in every service.
COUNTRY_CODES = frozenset(
    (  # noqa: SIM905 - 252 codes read better as text than as a 252-line list
        "AD AE AF AG AI AL AM AO AP AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO "
        "BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK "
        "DM DO DZ EC EE EG EH ER ES ET EU FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ "
        "GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI "
        "KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO "
        "MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK "
        "PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS "
        "ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE "
        "VG VI VN VU WF WS XK YE YT ZA ZM ZW "
    ).split()
)
MAX_TEXT = 200  # characters of country_name, org; far above any real name
# Names are shown by dashboards: no control characters, no markup, no bidi or zero-width tricks.
_NOT_TEXT_CHARS = r"\x00-\x1f\x7f-\x9f<>\u200b-\u200f\u202a-\u202e\u2066-\u2069"
_TEXT_PATTERN = rf"^[^{_NOT_TEXT_CHARS}]+$"
_NOT_TEXT = re.compile(rf"[{_NOT_TEXT_CHARS}]+")
ASN_PATTERN = r"^AS[0-9]{1,10}$"

# A row's address: IPv4 only in its one canonical spelling (no leading zeros), checked by
# pydantic-core's regex alone; anything with a colon is normalized as ip.seen's addresses are.
# Tried in that order, so the usual IPv4 row costs no Python call (~0.7 us a row saved).
_V4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
Ipv4Text = Annotated[
    str, StringConstraints(strict=True, pattern=rf"^(?:{_V4_OCTET}\.){{3}}{_V4_OCTET}$")
]
Ipv6Text = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=2, max_length=45, pattern=r"^[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*$"
    ),
    AfterValidator(normalize_ip),
]
IpText = Annotated[Ipv4Text | Ipv6Text, Field(union_mode="left_to_right")]


if TYPE_CHECKING:
    CountryCode = str
else:  # a Literal: pydantic-core checks it with one hash lookup; the schema shows the shape
    CountryCode = Annotated[
        Literal[tuple(sorted(COUNTRY_CODES))],
        WithJsonSchema({"type": "string", "pattern": "^[A-Z]{2}$"}),
    ]
Text = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=MAX_TEXT, pattern=_TEXT_PATTERN)
]
Asn = Annotated[str, StringConstraints(strict=True, pattern=ASN_PATTERN)]
ProviderName = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")
]


def clean_text(value: str | None) -> str | None:
    """A provider's name or org as a row may carry it: forbidden characters dropped, clipped to
    ``MAX_TEXT``, None if nothing is left, so the resolver never emits a row persistence refuses."""
    if not value:
        return None
    value = _NOT_TEXT.sub("", value).strip()[:MAX_TEXT].strip()
    return value or None


def clean_asn(value: str | None) -> str | None:
    """``AS`` and 1 to 10 ASCII digits (a 32-bit AS number), else None."""
    return value if value is not None and _ASN.match(value) else None


_ASN = re.compile(ASN_PATTERN)


class GeoRow(NamedTuple):
    """One ``geo_cache`` row as the resolver knows it; on the wire a JSON array in this order.

    Arrays, not objects: a 1000-row batch validates about six times faster and is a third
    smaller, which is most of persistence's cost per row. Each field's type checks its shape;
    ``check_rows`` adds what spans fields.
    """

    ip: IpText
    resolution: Resolution
    cached_at: IsoUtc  # e.g. 2026-11-22T12:01:26.519722Z
    country_code: CountryCode | None = None
    country_name: Text | None = None
    asn: Asn | None = None
    org: Text | None = None
    provider: ProviderName | None = None


def check_rows(rows: list[GeoRow]) -> list[GeoRow]:
    """The rule that spans a row's fields: ``country_code`` is set exactly when the resolution is
    ``resolved`` (and a row without a country has no name, asn or org either).

    Persistence's decode is its hot path, so the usual batch is checked with two passes in C; a
    row-by-row look only happens when they find an unresolved row, or a row to name.
    """
    if None in map(_CODE, rows) or list(map(_RESOLUTION, rows)).count(_RESOLVED) != len(rows):
        for i, row in enumerate(rows):
            _check_answer(i, row)
    return rows


def _check_answer(i: int, row: GeoRow) -> None:
    if row.resolution is _RESOLVED:
        if row.country_code is None:
            raise ValueError(f"row {i}: a resolved row needs a country_code")
    elif row[3:7] != _NO_ANSWER:
        raise ValueError(
            f"row {i}: a {row.resolution.value} row has no country_code, country_name, asn or org"
        )


_RESOLUTION, _CODE = itemgetter(1), itemgetter(3)
_RESOLVED = Resolution.RESOLVED
_NO_ANSWER = (None, None, None, None)

CheckedRows = Annotated[list[GeoRow], AfterValidator(check_rows)]

ROWS_DESCRIPTION = (
    "[ip, resolution, cached_at, country_code, country_name, asn, org, provider]. ip is "
    "normalized like ip.seen's; country_code is an ISO 3166-1 alpha-2 code (or EU, AP, XK), "
    "set exactly when resolution is 'resolved' (otherwise country_name, asn and org are null "
    "too); cached_at is a real moment, at most 5 minutes ahead of persistence's clock."
)


class GeoUpsertBatch(BaseModel):
    """Command ``geo.upsert`` (resolver to persistence): write these rows in one transaction."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    batch_id: str = Field(description="Unique per batch, for logs and duplicate detection.")
    rows: CheckedRows = Field(
        min_length=1,
        max_length=MAX_ROWS_PER_UPSERT,
        description=ROWS_DESCRIPTION,
        examples=[
            [
                [
                    "8.8.8.8",
                    "resolved",
                    "2026-11-22T12:01:26.519722Z",
                    "US",
                    "United States",
                    None,
                    None,
                    "embedded",
                ]
            ]
        ],
    )


class IpResolved(BaseModel):
    """Event ``ip.resolved`` (resolver, after each flush): these answers are now on their way
    into ``geo_cache``, for dashboards that update live. Nobody has to listen."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    rows: CheckedRows = Field(
        min_length=1, max_length=MAX_ROWS_PER_UPSERT, description=ROWS_DESCRIPTION
    )


ROW_FIELDS = GeoRow._fields  # geo_cache's columns too, in this order


class Answer(Protocol):
    """What a row says of its IP: every ``GeoRow`` field but ``ip`` and ``cached_at`` (the
    resolver's ``Geo`` has them, and so has a ``GeoRow``)."""

    @property
    def resolution(self) -> Resolution: ...
    @property
    def country_code(self) -> str | None: ...
    @property
    def country_name(self) -> str | None: ...
    @property
    def asn(self) -> str | None: ...
    @property
    def org(self) -> str | None: ...
    @property
    def provider(self) -> str | None: ...


# An IP, its answer and when it was obtained: ISO text, or a time.time() value to format.
RowParts = tuple[str, Answer, str | float]


def encode_rows(rows: Sequence[RowParts]) -> bytes:
    """The ``rows`` array of ``GeoUpsertBatch``, ``IpResolved`` and ``KnownRows``: each row a
    JSON array in ``GeoRow`` order, built with the C json encoder: ~5x cheaper than pydantic
    models, and no ``GeoRow`` is built per row (a flush's hot path). The IPs of one delivery
    share their stamp, so each stamp is formatted once."""
    stamps = {at: _iso(at) for at in {at for _, _, at in rows}}
    return json.dumps(
        [
            (ip, a.resolution, stamps[at], a.country_code, a.country_name, a.asn, a.org, a.provider)
            for ip, a, at in rows
        ],
        separators=(",", ":"),
    ).encode()


# The tuple above, field by field: a GeoRow field added, dropped or moved stops every service.
_ENCODED = (
    "ip",
    "resolution",
    "cached_at",
    "country_code",
    "country_name",
    "asn",
    "org",
    "provider",
)
if ROW_FIELDS != _ENCODED:
    raise AssertionError(f"encode_rows writes {_ENCODED}, GeoRow has {ROW_FIELDS}")


def _iso(at: str | float) -> str:
    return at if isinstance(at, str) else iso_utc_from_epoch(at)


def encode_geo_rows(rows: Iterable[GeoRow]) -> bytes:
    """``encode_rows`` of ready rows."""
    return encode_rows([(row.ip, row, row.cached_at) for row in rows])


_ROWS = TypeAdapter(CheckedRows)


def decode_rows(rows: bytes) -> list[GeoRow]:
    """The rows ``encode_rows`` wrote, validated as a consumer validates them."""
    return _ROWS.validate_json(rows)


def upsert_body(batch_id: str, rows: bytes) -> bytes:
    """A ``geo.upsert`` body around an encoded ``rows`` array."""
    return b'{"batch_id":%s,"rows":%s}' % (json.dumps(batch_id).encode(), rows)


def resolved_body(rows: bytes) -> bytes:
    """An ``ip.resolved`` (or ``KnownRows``) body around an encoded ``rows`` array."""
    return b'{"rows":%s}' % rows


class KnownQuery(BaseModel):
    """Command ``geo.known`` (resolver to persistence, request/reply): which of these IPs does
    ``geo_cache`` already answer? The reply is a ``KnownRows``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ips: list[Ip] = Field(min_length=1, max_length=MAX_IPS_PER_MESSAGE)


class KnownRows(BaseModel):
    """Reply to ``geo.known``: the rows with a final answer (``resolved``, ``not_global``,
    ``rejected``) among the IPs asked for; IPs without one are left out."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    rows: CheckedRows = Field(max_length=MAX_ROWS_PER_UPSERT, description=ROWS_DESCRIPTION)


DEFAULT_LOOKUP_TIMEOUT_MS = 2000
MAX_LOOKUP_TIMEOUT_MS = 30_000
PENDING = "pending"  # a geo.lookup reply row not answered by the deadline


def _whole_number(value: object) -> object:
    """A JSON number without a fraction, as JSON Schema's ``integer`` (so 2000.0 passes and
    "2000" does not): the schema and the service must judge a body alike."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


class GeoLookupRequest(BaseModel):
    """Request ``geo.lookup`` (any component to the resolver, with ``reply_to`` and
    ``correlation_id``): the answers for these addresses, in a ``GeoLookupReply``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ips: list[Ip] = Field(
        min_length=1,
        max_length=MAX_IPS_PER_MESSAGE,
        description="1 to 1000 IPv4 or IPv6 addresses, normalized as for ip.seen.",
        examples=[["203.0.113.7", "2001:db8::1"]],
    )
    timeout_ms: Annotated[int, BeforeValidator(_whole_number)] = Field(
        default=DEFAULT_LOOKUP_TIMEOUT_MS,
        ge=1,
        le=MAX_LOOKUP_TIMEOUT_MS,
        description="How long the requester waits (1 to 30000 ms); addresses not answered by "
        "then are pending.",
    )


LookupResolution = Literal["resolved", "failed", "not_global", "rejected", "pending"]


class LookupRow(NamedTuple):
    """A ``geo.lookup`` reply row: a ``GeoUpsertBatch`` row, or ``pending`` with NULL fields."""

    ip: IpText
    resolution: LookupResolution
    cached_at: IsoUtc | None
    country_code: CountryCode | None = None
    country_name: Text | None = None
    asn: Asn | None = None
    org: Text | None = None
    provider: ProviderName | None = None


class GeoLookupReply(BaseModel):
    """Reply to ``geo.lookup``: one row per requested address, in request order."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    rows: list[LookupRow] = Field(
        min_length=1,
        max_length=MAX_IPS_PER_MESSAGE,
        description=ROWS_DESCRIPTION + " resolution 'pending' (all other fields null): not "
        "answered by the deadline; it is still resolved and stored.",
    )


class RequestError(BaseModel):
    """Reply to a malformed request that carried a ``reply_to``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    error: str = Field(description="Why the request was refused.")


MESSAGE_MODELS: tuple[type[BaseModel], ...] = (
    IpSeen,
    IpResolved,
    FlushDirty,
    ReResolveStale,
    RetryUnresolved,
    GeoUpsertBatch,
    KnownQuery,
    KnownRows,
    GeoLookupRequest,
    GeoLookupReply,
    RequestError,
)
