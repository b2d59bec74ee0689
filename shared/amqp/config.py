"""What ``Amqp.open`` needs of the settings, as a small frozen value built in one place
(``amqp_config``), so the AMQP plumbing does not read the whole ``Settings``."""

from __future__ import annotations

from dataclasses import dataclass

from shared import topology
from shared.settings import Settings

# A delivery held unsettled longer than this, or than 7 flush intervals (the resolver holds
# deliveries until a flush, and its watchdog may take two periods of 3 intervals), is stuck.
STUCK_AFTER_MIN_S = 120.0
STUCK_AFTER_FLUSHES = 7


@dataclass(frozen=True)
class AmqpConfig:
    url: str  # GEO_AMQP_URL: one broker, or a comma-separated list of cluster nodes
    queue_type: topology.QueueType
    publish_timeout: float  # seconds to wait for a publish's confirm
    max_message_bytes: int  # larger bodies are dead-lettered unread
    stuck_after_s: float  # /health calls a consumer stuck past this unsettled age


def amqp_config(settings: Settings, *, held_for_s: float = 0.0) -> AmqpConfig:
    """The AMQP part of ``settings``. A delivery counts as stuck after seven flush intervals,
    at least two minutes, and after ``held_for_s``: how long a service may otherwise hold one
    on purpose (the resolver's, for an IP queued for ip-api)."""
    return AmqpConfig(
        url=settings.amqp_url,
        queue_type=settings.queue_type,
        publish_timeout=settings.publish_timeout,
        max_message_bytes=settings.max_message_bytes,
        stuck_after_s=max(
            STUCK_AFTER_MIN_S, STUCK_AFTER_FLUSHES * settings.flush_interval, held_for_s
        ),
    )
