"""What a dead letter says about itself, trusting only what the broker or our services wrote.

A publisher may set any header, so a dead letter's origin is read from the broker's newest
``x-death`` entry when the broker dead-lettered it (the queue it names, mapped by our topology),
or from our ``x-geo-*`` headers when a service did (only services may write to ``bangui.dlx``,
and they never copy those headers from a delivery). Pure, so the rules are unit-tested.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from shared import topology

Writer = Literal["broker", "service", "unknown"]


MAX_COPIED_HEADER_BYTES = 16_384
DROPPED_HEADERS = "x-geo-dropped-headers"


def _approximate_size(value: object) -> int:
    """About how many bytes ``value`` takes in an AMQP field table (never less)."""
    if isinstance(value, Mapping):
        return sum(len(str(k)) + 8 + _approximate_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(8 + _approximate_size(v) for v in value)
    if isinstance(value, bytes | bytearray):
        return len(value) + 8
    return len(str(value).encode("utf-8", "replace")) + 8


def dead_letter_headers(
    incoming: Mapping[str, object] | None,
    *,
    reason: str,
    service: str,
    queue: str,
    delivered_as: str,
) -> dict[str, object]:
    """The headers of the copy a service dead-letters: the delivery's own, minus every header
    the broker or we would be trusted for, plus ours."""
    kept = {
        name: value
        for name, value in (incoming or {}).items()
        if not name.lower().startswith(topology.UNTRUSTED_HEADER_PREFIXES)
    }
    size = _approximate_size(kept)
    if size > MAX_COPIED_HEADER_BYTES:
        # A publisher's headers sized near the broker's frame limit would push our copy over it,
        # and the broker closes the whole connection on an oversized frame: drop them, say so.
        kept = {DROPPED_HEADERS: f"{len(kept)} headers of about {size} bytes"}
    kept.update(
        {
            topology.REASON_HEADER: reason,
            topology.SERVICE_HEADER: service,
            topology.QUEUE_HEADER: queue,
            topology.ROUTING_KEY_HEADER: delivered_as,
        }
    )
    return kept


@dataclass(frozen=True)
class DeadLetter:
    """A message in ``geo.dead_letter``: why it is there and where a replay would send it."""

    body: bytes
    routing_key: str  # as it reached geo.dead_letter
    replay_key: str | None  # the trusted route it came by on ``bangui``, if known
    reason: str
    rejected_by: str | None
    original_queue: str | None
    written_by: Writer = "unknown"  # who dead-lettered it, so whose record is trusted
    delivered_as: str | None = None  # the routing key the rejected delivery had
    refusal: str | None = None  # why a replay keeps it instead (None: it may go back)
    dead_at: datetime | None = None  # when the broker or the service dead-lettered it


def matches(
    letter: DeadLetter,
    *,
    now: datetime,
    older_than: timedelta | None = None,
    reason: re.Pattern[str] | None = None,
) -> bool:
    """Whether ``dead-letters purge`` removes ``letter``: every given criterion must hold, and a
    letter of unknown age is never "older than" anything."""
    if older_than is not None and (letter.dead_at is None or now - letter.dead_at < older_than):
        return False
    return reason is None or reason.search(letter.reason) is not None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _newest_death(headers: Mapping[str, object]) -> Mapping[str, object] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]  # the broker puts the death it just recorded first
    return None


def _refusal(route: str | None, queue: str | None, delivered_as: str | None) -> str | None:
    if route is None:
        where = f"from {queue}, not a queue of ours" if queue else "of unknown origin"
        return f"kept: {where}"
    if delivered_as is not None and delivered_as != route:
        return (
            f"kept: it reached {queue} as {delivered_as}, a route that queue is not bound for "
            "(a CC/BCC header)"
        )
    if route not in topology.REPLAYABLE_ROUTES:
        return f"kept: {route} is not replayed (the timer sends a fresh command each tick)"
    return None


def _moment(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def dead_letter_from(
    body: bytes,
    routing_key: str,
    headers: Mapping[str, object],
    timestamp: datetime | None = None,
) -> DeadLetter:
    """Read who dead-lettered the message, and from which queue, from the trusted record only
    (``timestamp``: the AMQP property, which our services set when they dead-letter)."""
    death = _newest_death(headers)
    if death is not None:  # the broker's own: x-geo-* and routing keys may be a publisher's
        queue = _text(death.get("queue"))
        route = topology.route_of_queue(queue) if queue else None
        why = _text(death.get("reason"))
        # The broker dead-letters under the routing key the message was published with, which a
        # publisher's topic permission bounds: a CC/BCC copy that expired in another route's
        # queue still carries its own key (e.g. ip.seen in geo.persistence.upsert).
        refusal = _refusal(route, queue, routing_key or None)
        return DeadLetter(
            body=body,
            routing_key=routing_key,
            replay_key=route,
            reason=f"dead-lettered by the broker: {why}" if why else "dead-lettered by the broker",
            rejected_by=None,
            original_queue=queue,
            written_by="broker",
            delivered_as=None,
            refusal=refusal,
            dead_at=_moment(death.get("time")),
        )
    service = _text(headers.get(topology.SERVICE_HEADER))
    if service is not None:  # one of ours published it to bangui.dlx
        queue = _text(headers.get(topology.QUEUE_HEADER))
        route = topology.route_of_queue(queue) if queue else None
        delivered_as = _text(headers.get(topology.ROUTING_KEY_HEADER))
        refusal = _refusal(route, queue, delivered_as)
        if refusal is None and routing_key != route:
            refusal = f"kept: dead-lettered as {routing_key}, but {queue} is for {route}"
        return DeadLetter(
            body=body,
            routing_key=routing_key,
            replay_key=route,
            reason=_text(headers.get(topology.REASON_HEADER)) or "unknown",
            rejected_by=service,
            original_queue=queue,
            written_by="service",
            delivered_as=delivered_as,
            refusal=refusal,
            dead_at=_moment(timestamp),
        )
    return DeadLetter(
        body=body,
        routing_key=routing_key,
        replay_key=None,
        reason="unknown",
        rejected_by=None,
        original_queue=None,
        refusal="kept: neither the broker nor a service recorded where it came from",
    )
