"""A resolver built by its real ``build_deps`` over in-memory fakes, driven as the broker would
drive it (``seen``, ``retry``) and read back as persistence would (``batches``, ``rows``): shared
by the resolver's unit tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.resolver.bootstrap import build_deps
from services.resolver.geo import Geo
from services.resolver.handlers import ResolverDeps, on_ip_seen, on_retry_unresolved
from shared import topology
from shared.messages import GeoRow, GeoUpsertBatch, IpSeen, Resolution, RetryUnresolved
from shared.settings import Settings
from tests.fakes import FakeAcker, FakeLookup, FakePublisher, FakeTicket, ManualClock

US = Geo("US", "United States", "AS15169", "Google LLC", Resolution.RESOLVED, "fake")
AU = Geo("AU", "Australia", None, None, Resolution.RESOLVED, "fake")


@dataclass
class Resolver:
    deps: ResolverDeps
    lookup: FakeLookup
    publisher: FakePublisher
    acker: FakeAcker
    clock: ManualClock

    async def seen(self, *ips: str, ticket: str = "t") -> FakeTicket:
        held = FakeTicket(ticket)
        event = IpSeen(ip=ips[0]) if len(ips) == 1 else IpSeen(ips=list(ips))
        await on_ip_seen(event, held, self.deps)
        return held

    async def retry(self, *ips: str, ticket: str = "r") -> FakeTicket:
        held = FakeTicket(ticket)
        await on_retry_unresolved(
            RetryUnresolved(tick_id="re_resolve:1.000", ips=list(ips)), held, self.deps
        )
        return held

    def batches(self) -> list[GeoUpsertBatch]:
        out = self.publisher.on(topology.UPSERT)
        assert all(isinstance(m, GeoUpsertBatch) for m in out)
        return [m for m in out if isinstance(m, GeoUpsertBatch)]

    def rows(self) -> dict[str, GeoRow]:
        return {row.ip: row for batch in self.batches() for row in batch.rows}


def make_resolver(answers: dict[str, Geo] | None = None, **settings: Any) -> Resolver:
    values: dict[str, Any] = {
        "cache_max_entries": 10_000,
        "negative_ttl": 300.0,
        "prefetch": 2000,
        "flush_max_dirty": 20_000,
    }
    values.update(settings)
    lookup = FakeLookup(answers if answers is not None else {"8.8.8.8": US, "1.1.1.1": AU})
    publisher, acker, clock = FakePublisher(), FakeAcker(), ManualClock()
    deps = build_deps(
        Settings(**values), lookup=lookup, publisher=publisher, acker=acker, clock=clock
    )
    return Resolver(deps, lookup, publisher, acker, clock)
