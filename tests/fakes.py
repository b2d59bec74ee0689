"""In-memory stand-ins for the ports, so handlers are tested through the real code paths
without a broker, a database or a network (cosmicpython's pattern)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from services.persistence.ports import RetryBackoff, Sightings
from services.resolver.geo import Geo
from shared.messages import GeoRow, Resolution
from shared.ports import Ticket
from shared.routes import ROUTES

# What a body published under each routing key decodes into: the route table's models.
MODELS_BY_ROUTING_KEY: dict[str, type[BaseModel]] = {r.routing_key: r.model for r in ROUTES}


@dataclass
class FakePublisher:
    """Records what would be published; ``fail_next`` makes the next publish raise."""

    published: list[tuple[str, BaseModel, float | None]] = field(default_factory=list)
    mandatory: dict[str, bool] = field(default_factory=dict)
    fail_next: BaseException | None = None

    async def publish(
        self,
        routing_key: str,
        messages: Sequence[BaseModel],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.published.extend((routing_key, m, expiration) for m in messages)
        self.mandatory[routing_key] = mandatory

    async def publish_bodies(
        self,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        expiration: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """Decode with the routing key's model, as the consumer would, and record the models."""
        model = MODELS_BY_ROUTING_KEY[routing_key]
        await self.publish(
            routing_key,
            [model.model_validate_json(body) for body in bodies],
            expiration=expiration,
            mandatory=mandatory,
        )

    def on(self, routing_key: str) -> list[BaseModel]:
        return [m for key, m, _ in self.published if key == routing_key]


@dataclass(frozen=True)
class FakeTicket:
    name: str


@dataclass
class FakeAcker:
    acked: list[Ticket] = field(default_factory=list)

    async def ack(self, tickets: Sequence[Ticket]) -> None:
        self.acked.extend(tickets)


@dataclass
class FakeLookup:
    """Answers from a fixed table; records every call; ``broken`` makes lookups raise."""

    answers: Mapping[str, Geo]
    name: str = "fake"
    calls: list[list[str]] = field(default_factory=list)
    broken: bool = False
    closed: bool = False

    async def lookup(self, ips: Sequence[str]) -> Mapping[str, Geo]:
        self.calls.append(list(ips))
        if self.broken:
            raise ConnectionError("provider down")
        return {ip: self.answers[ip] for ip in ips if ip in self.answers}

    async def close(self) -> None:
        self.closed = True

    @property
    def looked_up(self) -> list[str]:
        return [ip for call in self.calls for ip in call]


@dataclass
class ManualClock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class InMemoryGeoRepository:
    rows: dict[str, GeoRow] = field(default_factory=dict)
    commits: int = 0

    retried: list[str] = field(default_factory=list)
    seen: list[Sightings] = field(default_factory=list)
    backoffs: list[RetryBackoff | None] = field(default_factory=list)

    async def upsert_many(
        self, rows: Sequence[GeoRow], retried: Sequence[str] = (), seen: Sightings | None = None
    ) -> int:
        for row in rows:
            self.rows[row.ip] = row
        self.retried.extend(retried)
        if seen is not None:
            self.seen.append(seen)
        self.commits += 1
        return len(rows)

    async def unresolved_ips(self, backoff: RetryBackoff | None = None) -> list[str]:
        self.backoffs.append(backoff)
        return [
            ip
            for ip, row in self.rows.items()
            if row.country_code is None and row.resolution is Resolution.FAILED
        ]

    async def stale_ips(self, older_than: str, limit: int) -> list[str]:
        due = [r for r in self.rows.values() if r.resolution is Resolution.RESOLVED]
        due = [r for r in due if r.cached_at < older_than]
        return [r.ip for r in sorted(due, key=lambda r: (r.cached_at, r.ip))][:limit]

    async def missing(self, ips: Sequence[str]) -> list[str]:
        return [ip for ip in dict.fromkeys(ips) if ip not in self.rows]

    async def known_rows(self, ips: Sequence[str]) -> list[GeoRow]:
        return [
            row
            for ip in dict.fromkeys(ips)
            if (row := self.rows.get(ip)) is not None and row.resolution is not Resolution.FAILED
        ]
