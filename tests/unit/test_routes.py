"""The route table agrees with the topology, and a service whose wiring is wrong (a route left
out, one of another service's, a handler of the wrong kind) fails at start, before any consumer
exists."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from services.persistence.bootstrap import persistence_routes
from services.persistence.handlers import PersistenceDeps, on_re_resolve
from services.resolver.bootstrap import build_deps, resolver_routes
from services.resolver.handlers import on_flush_dirty, on_ip_seen, on_retry_unresolved
from services.resolver.lookup_requests import on_geo_lookup
from shared import routes, topology
from shared.amqp import AmqpConfig
from shared.amqp.memory import MemoryBroker
from shared.errors import StartupError
from shared.messages import FlushDirty, IpSeen
from shared.ports import Ticket
from shared.routes import (
    ROUTES,
    Answers,
    Deferred,
    Kind,
    Plain,
    Wired,
    WiringError,
    consumed_by,
    wire,
    wiring,
)
from shared.settings import Settings
from tests.fakes import FakeAcker, FakeLookup, FakePublisher, InMemoryGeoRepository


def resolver_deps() -> Any:
    settings = Settings()
    return build_deps(settings, lookup=FakeLookup({}), publisher=FakePublisher(), acker=FakeAcker())


def test_every_queue_of_the_topology_is_a_route_of_the_table() -> None:
    queues = {route.queue for route in ROUTES if route.queue is not None}
    assert queues == {*topology.WORK_QUEUES, topology.RESOLVER_FLUSH}
    for route in ROUTES:
        if route.queue is not None:
            assert route.queue.route == route.routing_key
            assert route.consumer is not None
            assert route.handler is not None
        else:
            assert route.consumer is None  # ip.resolved: nobody of ours listens
    assert {r.routing_key for r in ROUTES if r.kind is Kind.EVENT} == {"ip.seen", "ip.resolved"}
    assert {r.routing_key for r in ROUTES if r.handler is Answers} == {"geo.lookup", "geo.known"}
    assert all((r.reply is not None) == (r.handler is Answers) for r in ROUTES)


def test_the_flush_queue_is_named_per_replica() -> None:
    spec = routes.FLUSH.queue
    assert spec is not None
    assert spec.per_replica
    assert spec.replica_name("host.42") == "geo.resolver.flush.host.42"
    assert topology.RESOLVER_IP_SEEN.replica_name("host.42") == "geo.resolver.ip_seen"


def test_the_bootstraps_wire_every_route_their_service_consumes() -> None:
    resolver = resolver_routes(resolver_deps())
    assert {w.route for w in resolver} == set(consumed_by("resolver"))
    deps = PersistenceDeps(repository=InMemoryGeoRepository(), publisher=FakePublisher())
    persistence = persistence_routes(deps)
    assert {w.route for w in persistence} == set(consumed_by("persistence"))
    # The per-replica geo.flush first (a backlog of ip.seen must not delay its consumer), then
    # as wired: ip.seen before the requests, as the resolver always started them.
    assert [w.route for w in resolver] == [
        routes.FLUSH,
        routes.IP_SEEN,
        routes.LOOKUP,
        routes.RETRY,
    ]
    shuffled = wiring("resolver", *reversed(_resolver_wired(resolver_deps())))
    assert next(iter(shuffled)).route is routes.FLUSH


def _resolver_wired(deps: Any) -> list[Wired[Any]]:
    return [
        wire(routes.FLUSH, Plain(partial(on_flush_dirty, deps=deps))),
        wire(routes.IP_SEEN, Deferred(partial(on_ip_seen, deps=deps))),
        wire(routes.LOOKUP, Answers(partial(on_geo_lookup, deps=deps))),
        wire(routes.RETRY, Deferred(partial(on_retry_unresolved, deps=deps))),
    ]


def test_a_handler_of_the_wrong_kind_fails_at_start() -> None:
    deps = resolver_deps()
    wired = _resolver_wired(deps)

    async def plain_ip_seen(event: IpSeen) -> None:  # forgets the ticket: never acked
        del event

    wired[1] = wire(routes.IP_SEEN, Plain(plain_ip_seen))
    with pytest.raises(WiringError, match=r"ip\.seen needs a Deferred handler, not Plain"):
        wiring("resolver", *wired)
    assert issubclass(WiringError, StartupError)  # one line, exit 1, no traceback


def test_a_route_left_out_fails_at_start() -> None:
    wired = _resolver_wired(resolver_deps())
    with pytest.raises(WiringError, match=r"geo\.retry not wired"):
        wiring("resolver", *wired[:3])


def test_a_route_of_another_service_or_twice_fails_at_start() -> None:
    deps = resolver_deps()
    wired = _resolver_wired(deps)
    persistence = PersistenceDeps(repository=InMemoryGeoRepository(), publisher=FakePublisher())
    stray = wire(routes.RE_RESOLVE, Plain(partial(on_re_resolve, deps=persistence)))
    with pytest.raises(WiringError, match=r"geo\.re_resolve is consumed by persistence"):
        wiring("resolver", *wired, stray)
    with pytest.raises(WiringError, match=r"geo\.flush wired twice"):
        wiring("resolver", *wired, wired[0])


def test_a_route_not_in_the_table_fails_at_start() -> None:
    async def flush(cmd: FlushDirty, ticket: Ticket) -> None:
        del cmd, ticket

    copy = routes.Route(topology.FLUSH, FlushDirty, Kind.COMMAND, "timer", "resolver", public=False)
    with pytest.raises(WiringError, match="not the route table's"):
        wiring("resolver", wire(copy, Deferred(flush)))


async def test_a_miswired_service_starts_no_consumer(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through the real bootstrap: the wiring is checked before the first consumer starts.
    broker = MemoryBroker()
    settings = Settings(db_path=tmp_path / "geo.sqlite3")
    opened: list[Any] = []

    async def transport(config: AmqpConfig, *, service: str, stop: asyncio.Event) -> Any:
        opened.append(await broker.open(config, service=service, stop=stop))
        return opened[-1]

    from services.persistence import bootstrap

    def broken(deps: PersistenceDeps) -> routes.Wiring:
        return wiring("persistence", wire(routes.UPSERT, Plain(partial(on_re_resolve, deps=deps))))

    monkeypatch.setattr(bootstrap, "persistence_routes", broken)
    with pytest.raises(WiringError, match="not wired"):
        await bootstrap.run(settings, asyncio.Event(), transport=transport)
    assert opened
    assert opened[0].consumers == []
    assert opened[0].closed
