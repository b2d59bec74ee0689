"""How long the resolver may hold a delivery on purpose, so /health does not call a consumer
stuck that is only waiting: for the flush that carries its IPs (``shared.amqp.config``), and for
an IP queued for ip-api (a rate-limited backlog is slow, not stuck)."""

from __future__ import annotations

from shared.amqp import AmqpConfig, amqp_config
from shared.settings import Settings


def resolver_amqp_config(settings: Settings) -> AmqpConfig:
    return amqp_config(settings, held_for_s=ipapi_hold(settings))


def ipapi_hold(settings: Settings) -> float:
    """Longer than an IP may queue for ip-api, when the provider chain has it."""
    if "ip-api" not in settings.provider_chain:
        return 0.0
    return settings.ipapi_max_wait + 2 * settings.flush_interval
