"""What /health answers: "ok" only while connected, with the topology kept, no delivery held too
long and no dead letter failed lately; otherwise the first problem, and all of them."""

from __future__ import annotations

from shared.metrics import ConsumerHealth, Health, health_of


def health(*consumers: ConsumerHealth, connected: bool = True, fault: str | None = None) -> Health:
    return health_of(
        connected=connected,
        fault=fault,
        consumers=consumers,
        stuck_after_s=120.0,
        failing_for_s=300.0,
    )


def test_ok_with_recent_deliveries_and_old_failures() -> None:
    recent = ConsumerHealth(
        "geo.resolver.ip_seen", oldest_unsettled_s=119.0, dead_letter_failed_s=None
    )
    old = ConsumerHealth(
        "geo.persistence.upsert", oldest_unsettled_s=None, dead_letter_failed_s=301.0
    )
    result = health(recent, old)
    assert (result.status, result.problems) == ("ok", ())


def test_a_held_delivery_and_a_failed_dead_letter_are_reported() -> None:
    stuck = ConsumerHealth(
        "geo.persistence.upsert", oldest_unsettled_s=121.0, dead_letter_failed_s=5.0
    )
    result = health(stuck)
    assert result.status == "consumer_stuck"
    assert result.problems == (
        "geo.persistence.upsert: a delivery unsettled for 121 s",
        "geo.persistence.upsert: a dead letter could not be published 5 s ago",
    )


def test_a_lost_topology_or_connection_comes_first() -> None:
    assert health(fault="exchange 'bangui' does not exist").status == "topology_lost"
    assert health(connected=False).status == "broker_disconnected"
