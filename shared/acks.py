"""Which acks to send for a set of deliveries, using ``multiple=True`` where it is safe.

An ack with ``multiple=True`` settles every delivery up to its tag on that channel, so it is only
safe up to the highest tag below which every unsettled delivery is being acked now. Pure, so the
rule is unit-tested without a broker.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


def plan_acks(unsettled: Collection[int], to_ack: Iterable[int]) -> tuple[int | None, list[int]]:
    """Return (tag to ack with multiple=True or None, tags to ack one by one, ascending)."""
    wanted_set = set(to_ack)
    if not wanted_set:
        return None, []
    wanted = sorted(wanted_set)
    blockers = [tag for tag in unsettled if tag not in wanted_set]
    first_blocker = min(blockers) if blockers else None
    covered = [tag for tag in wanted if first_blocker is None or tag < first_blocker]
    rest = wanted[len(covered) :]
    if len(covered) <= 1:
        return None, wanted
    return covered[-1], rest
