"""The route table: for each routing key, its message model, its queue, who sends and who
receives it, and what kind of handler consumes it, as plain data in one place.

The AMQP layer starts one consumer per wired route from it, ``shared.asyncapi`` describes it, and
the test fakes decode with it. A service wires its routes with ``wiring``, which refuses, at
start, a route left out, a route of another service, or a handler of the wrong kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from shared import topology
from shared.errors import StartupError
from shared.messages import (
    FlushDirty,
    GeoLookupReply,
    GeoLookupRequest,
    GeoUpsertBatch,
    IpResolved,
    IpSeen,
    KnownQuery,
    KnownRows,
    ReResolveStale,
    RetryUnresolved,
)
from shared.ports import Ticket
from shared.salvage import Salvage, salvage_ip_seen

M = TypeVar("M", bound=BaseModel)

Service = Literal["resolver", "persistence"]
Salvager = Callable[[bytes], Salvage | None]


class Kind(Enum):
    """A command has one handler and its failure is an error; an event is a fact that may have
    any number of listeners, ours or none."""

    COMMAND = "command"
    EVENT = "event"


@dataclass(frozen=True)
class Plain(Generic[M]):
    """Handles the message in full; the delivery is acked when it returns."""

    handle: Callable[[M], Awaitable[None]]


@dataclass(frozen=True)
class Deferred(Generic[M]):
    """Takes the message and a ticket; the delivery is acked when the ticket is handed back."""

    handle: Callable[[M, Ticket], Awaitable[None]]


@dataclass(frozen=True)
class Answers(Generic[M]):
    """Answers a request: the body it returns is the reply, published at the ``reply_to``."""

    handle: Callable[[M], Awaitable[bytes]]


Handler = Plain[M] | Deferred[M] | Answers[M]
HandlerKind = type[Plain[Any]] | type[Deferred[Any]] | type[Answers[Any]]


@dataclass(frozen=True)
class Route(Generic[M]):
    routing_key: str
    model: type[M]
    kind: Kind
    senders: str
    receivers: str
    public: bool  # part of what other BanGUI components send or receive
    queue: topology.QueueSpec | None = None  # None: no consumer of ours
    consumer: Service | None = None
    handler: HandlerKind | None = None
    reply: type[BaseModel] | None = None  # request/reply: answered at the request's reply_to
    salvage: Salvager | None = None  # keeps the valid part of a message that is partly bad
    prefetch: int | None = None  # unacked deliveries per consumer; None: GEO_PREFETCH

    @property
    def channel_id(self) -> str:
        head, *rest = self.routing_key.replace("_", ".").split(".")
        return head + "".join(part.capitalize() for part in rest)


IP_SEEN: Route[IpSeen] = Route(
    topology.IP_SEEN,
    IpSeen,
    Kind.EVENT,
    "other BanGUI components (fail2ban action, web, importers)",
    "resolver",
    public=True,
    queue=topology.RESOLVER_IP_SEEN,
    consumer="resolver",
    handler=Deferred,
    salvage=salvage_ip_seen,  # one typo in a bulk import loses no other address
)
RESOLVED: Route[IpResolved] = Route(
    topology.RESOLVED,
    IpResolved,
    Kind.EVENT,
    "resolver, after each flush",
    "dashboards: bind a queue of your own",
    public=True,
)
FLUSH: Route[FlushDirty] = Route(
    topology.FLUSH,
    FlushDirty,
    Kind.COMMAND,
    "timer",
    "every resolver replica",
    public=False,
    queue=topology.RESOLVER_FLUSH,
    consumer="resolver",
    handler=Plain,
    prefetch=4,
)
RE_RESOLVE: Route[ReResolveStale] = Route(
    topology.RE_RESOLVE,
    ReResolveStale,
    Kind.COMMAND,
    "timer",
    "persistence",
    public=False,
    queue=topology.PERSISTENCE_RE_RESOLVE,
    consumer="persistence",
    handler=Plain,
    prefetch=1,
)
UPSERT: Route[GeoUpsertBatch] = Route(
    topology.UPSERT,
    GeoUpsertBatch,
    Kind.COMMAND,
    "resolver",
    "persistence",
    public=False,
    queue=topology.PERSISTENCE_UPSERT,
    consumer="persistence",
    handler=Plain,
    prefetch=8,
)
RETRY: Route[RetryUnresolved] = Route(
    topology.RETRY,
    RetryUnresolved,
    Kind.COMMAND,
    "persistence",
    "resolver",
    public=False,
    queue=topology.RESOLVER_RETRY,
    consumer="resolver",
    handler=Deferred,
)
LOOKUP: Route[GeoLookupRequest] = Route(
    topology.LOOKUP,
    GeoLookupRequest,
    Kind.COMMAND,
    "other BanGUI components (web, CLI)",
    "any resolver replica (competing consumers)",
    public=True,
    queue=topology.RESOLVER_LOOKUP,
    consumer="resolver",
    handler=Answers,
    reply=GeoLookupReply,
    prefetch=64,  # requests answered at once per replica
)
KNOWN: Route[KnownQuery] = Route(
    topology.KNOWN,
    KnownQuery,
    Kind.COMMAND,
    "resolver, on cache misses",
    "persistence",
    public=False,
    queue=topology.PERSISTENCE_KNOWN,
    consumer="persistence",
    handler=Answers,
    reply=KnownRows,
    prefetch=16,
)

ROUTES: tuple[Route[Any], ...] = (
    IP_SEEN,
    RESOLVED,
    FLUSH,
    RE_RESOLVE,
    UPSERT,
    RETRY,
    LOOKUP,
    KNOWN,
)
BY_ROUTING_KEY: dict[str, Route[Any]] = {route.routing_key: route for route in ROUTES}


@dataclass(frozen=True)
class Wired(Generic[M]):
    """One route and the handler a service gives it; ``wire`` checks the models match."""

    route: Route[M]
    handler: Handler[M]


def wire(route: Route[M], handler: Handler[M]) -> Wired[M]:
    return Wired(route, handler)


class WiringError(StartupError):
    """A service wired its routes wrongly: a programming error, caught before any consumer."""


@dataclass(frozen=True)
class Wiring:
    """The routes one service consumes, each with its handler, in the order their consumers
    start: per-replica queues first, then as wired (see ``wiring``)."""

    service: Service
    routes: tuple[Wired[Any], ...]

    def __iter__(self) -> Iterator[Wired[Any]]:
        return iter(self.routes)


def wiring(service: Service, *wired: Wired[Any]) -> Wiring:
    """The checked wiring of ``service``: every route of the table it consumes, once, each with
    a handler of the route's kind, and nothing else."""
    problems: list[str] = []
    seen: set[str] = set()
    for entry in wired:
        route, key = entry.route, entry.route.routing_key
        if key in seen:
            problems.append(f"{key} wired twice")
        seen.add(key)
        if BY_ROUTING_KEY.get(key) is not route:
            problems.append(f"{key} is not the route table's")
        elif route.consumer != service:
            problems.append(f"{key} is consumed by {route.consumer or 'no service of ours'}")
        elif route.handler is None or not isinstance(entry.handler, route.handler):
            wanted = route.handler.__name__ if route.handler else "none"
            got = type(entry.handler).__name__
            problems.append(f"{key} needs a {wanted} handler, not {got}")
    missing = [r.routing_key for r in ROUTES if r.consumer == service and r.routing_key not in seen]
    problems += [f"{key} not wired" for key in missing]
    if problems:
        raise WiringError(f"{service} routes: " + "; ".join(problems))
    # Per-replica queues (geo.flush) first: with a backlog, ip.seen deliveries would delay their
    # registration, and the timer's geo.flush would find no queue bound yet. The others start in
    # the order wired (the resolver's ip.seen before its requests: it is what a restart waits on).
    ordered = sorted(wired, key=lambda entry: not _per_replica(entry.route))
    return Wiring(service, tuple(ordered))


def _per_replica(route: Route[Any]) -> bool:
    return route.queue is not None and route.queue.per_replica


def consumed_by(service: Service) -> tuple[Route[Any], ...]:
    return tuple(route for route in ROUTES if route.consumer == service)


def queue_of(route: Route[Any]) -> topology.QueueSpec:
    """The queue a wired route is consumed from (every route a service consumes has one)."""
    if route.queue is None:
        raise WiringError(f"{route.routing_key} has no queue of ours to consume")
    return route.queue
