"""Names of the exchanges, routing keys and queues, declared once here as plain data.

With a user that may configure them (guest in development), every service declares the whole
topology at start (idempotently), so any start order works; with the deployment's users the
broker definitions own it and the services check it is there. Changing a queue's arguments is a
breaking change: RabbitMQ refuses a redeclaration with different arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EXCHANGE = "bangui"
DEAD_LETTER_EXCHANGE = "bangui.dlx"
DEAD_LETTER_QUEUE = "geo.dead_letter"

IP_SEEN = "ip.seen"
FLUSH = "geo.flush"
RE_RESOLVE = "geo.re_resolve"
UPSERT = "geo.upsert"
RETRY = "geo.retry"
RESOLVED = "ip.resolved"  # event after each flush, for live dashboards; may have no listener
LOOKUP = "geo.lookup"  # request/reply: any component asks the resolver, answered at reply_to
KNOWN = "geo.known"  # request/reply: the resolver asks persistence what geo_cache knows
# RabbitMQ's direct reply-to pseudo-queue: replies without a queue of the requester's own.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

# Dead-letter headers we add (the broker adds x-death for its own dead-lettering).
REASON_HEADER = "x-geo-reject-reason"
SERVICE_HEADER = "x-geo-rejected-by"
QUEUE_HEADER = "x-geo-original-queue"
ROUTING_KEY_HEADER = "x-geo-original-routing-key"  # the delivery's routing key
# What a service never copies from a delivery into its dead letter (lower case): the broker's
# record of earlier deaths, our own headers and the sender-selected routing headers, so that a
# header a publisher forged cannot pass for the broker's or ours.
UNTRUSTED_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-geo-", "cc", "bcc")


QueueType = Literal["classic", "quorum"]
REPLICA_PLACEHOLDER = "<host>.<pid>"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    routing_keys: tuple[str, ...]
    dead_letter: bool = True  # commands expire silently instead of piling into geo.dead_letter
    single_active: bool = False  # one consumer at a time; the others wait as hot standbys
    # Exclusive to one process, named by it (``name`` holds the ``<host>.<pid>`` placeholder):
    # each replica gets its own copy of every message, and the queue goes with the replica.
    per_replica: bool = False

    @property
    def route(self) -> str:
        """The routing key this queue is for: its dead letters go to ``bangui.dlx`` under it."""
        return self.routing_keys[0]

    def replica_name(self, replica: str) -> str:
        """The name of this replica's own queue (``replica`` is ``<host>.<pid>``)."""
        return self.name.replace(REPLICA_PLACEHOLDER, replica) if self.per_replica else self.name

    def declare_arguments(self, queue_type: QueueType = "classic") -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.dead_letter:
            args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
        if self.single_active:
            args["x-single-active-consumer"] = True
        if queue_type == "quorum":  # classic is the broker default: no argument, as before
            args["x-queue-type"] = "quorum"
        return args


RESOLVER_IP_SEEN = QueueSpec("geo.resolver.ip_seen", (IP_SEEN,))
RESOLVER_RETRY = QueueSpec("geo.resolver.retry", (RETRY,))
# Persistence is the single writer of the SQLite file: a second instance waits as a standby.
PERSISTENCE_UPSERT = QueueSpec("geo.persistence.upsert", (UPSERT,), single_active=True)
PERSISTENCE_RE_RESOLVE = QueueSpec(
    "geo.persistence.re_resolve", (RE_RESOLVE,), dead_letter=False, single_active=True
)
# Requests: competing resolver replicas answer geo.lookup; persistence (the active one, as for
# its other queues) answers geo.known. Invalid requests without a reply_to are dead-lettered.
RESOLVER_LOOKUP = QueueSpec("geo.resolver.lookup", (LOOKUP,))
PERSISTENCE_KNOWN = QueueSpec("geo.persistence.known", (KNOWN,), single_active=True)
DEAD_LETTER = QueueSpec(DEAD_LETTER_QUEUE, ("#",), dead_letter=False)

WORK_QUEUES: tuple[QueueSpec, ...] = (
    RESOLVER_IP_SEEN,
    RESOLVER_RETRY,
    PERSISTENCE_UPSERT,
    PERSISTENCE_RE_RESOLVE,
    RESOLVER_LOOKUP,
    PERSISTENCE_KNOWN,
)

# Every resolver replica gets every geo.flush: each declares its own exclusive queue named
# with this prefix (plus host and pid, for the management UI), gone when the replica is.
RESOLVER_FLUSH_PREFIX = "geo.resolver.flush."
RESOLVER_FLUSH_KEYS = (FLUSH,)
RESOLVER_FLUSH = QueueSpec(
    f"{RESOLVER_FLUSH_PREFIX}{REPLICA_PLACEHOLDER}",
    RESOLVER_FLUSH_KEYS,
    dead_letter=False,
    per_replica=True,
)

# Exclusive, server-named-by-us queue whose holder is the one active timer.
TIMER_LEADER_QUEUE = "geo.timer.leader"

# Where a dead letter may be sent back by a replay: events and commands whose effect is still
# wanted later. Timer commands are not replayed (the next tick sends a fresh one).
REPLAYABLE_ROUTES = (IP_SEEN, RETRY, UPSERT)


def route_of_queue(name: str) -> str | None:
    """The routing key the queue ``name`` of our topology is for; None for a queue not ours."""
    for spec in WORK_QUEUES:
        if spec.name == name:
            return spec.route
    if name.startswith(RESOLVER_FLUSH_PREFIX):
        return FLUSH
    return None
