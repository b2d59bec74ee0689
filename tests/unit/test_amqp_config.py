"""What ``Amqp.open`` is given of the settings (``shared.amqp.config``), and the typed
per-queue counters it registers: no broker needed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from services.resolver.stuck import resolver_amqp_config
from shared.amqp import Amqp, AmqpConfig, amqp_config
from shared.metrics import MetricsRegistry
from shared.settings import Settings


def test_the_config_carries_the_amqp_settings() -> None:
    settings = Settings(
        amqp_url="amqp://geo:pw@rabbit:5672/bangui",
        queue_type="quorum",
        publish_timeout=3.0,
        max_message_bytes=4096,
    )
    assert amqp_config(settings) == AmqpConfig(
        url="amqp://geo:pw@rabbit:5672/bangui",
        queue_type="quorum",
        publish_timeout=3.0,
        max_message_bytes=4096,
        stuck_after_s=420.0,  # seven flush intervals of 60 s
    )


@pytest.mark.parametrize(
    ("provider", "flush_interval", "ipapi_max_wait", "resolver", "others"),
    [
        ("embedded", 60.0, 300.0, 420.0, 420.0),
        ("embedded", 1.0, 300.0, 120.0, 120.0),  # never under two minutes
        ("embedded,ip-api", 1.0, 300.0, 302.0, 120.0),  # an ip-api backlog is slow, not stuck
        ("ip-api", 60.0, 3000.0, 3120.0, 420.0),
    ],
)
def test_a_held_delivery_is_stuck_after_seven_flushes_or_the_ip_api_wait(
    provider: str, flush_interval: float, ipapi_max_wait: float, resolver: float, others: float
) -> None:
    settings = Settings(
        provider=provider, flush_interval=flush_interval, ipapi_max_wait=ipapi_max_wait
    )
    assert resolver_amqp_config(settings).stuck_after_s == resolver
    assert amqp_config(settings).stuck_after_s == others


def test_each_consumer_count_is_a_metric_of_its_queue() -> None:
    counts = {
        "consumed": 7,
        "dead_lettered": 2,
        "dead_letter_failures": 1,
        "partly_dead_lettered": 3,
        "requeued": 4,
        "unsettled": 5,
    }
    consumer = SimpleNamespace(queue=SimpleNamespace(name="geo.ip_seen"), **counts)
    registry = MetricsRegistry("resolver")
    Amqp.register_metrics(cast(Amqp, SimpleNamespace(consumers=[consumer])), registry)
    text = registry.render()
    for line in (
        'geo_messages_consumed_total{service="resolver",queue="geo.ip_seen"} 7',
        'geo_dead_letters_total{service="resolver",queue="geo.ip_seen"} 2',
        'geo_dead_letter_failures_total{service="resolver",queue="geo.ip_seen"} 1',
        'geo_messages_partly_dead_lettered_total{service="resolver",queue="geo.ip_seen"} 3',
        'geo_messages_requeued_total{service="resolver",queue="geo.ip_seen"} 4',
        'geo_deliveries_unacked{service="resolver",queue="geo.ip_seen"} 5',
        "# TYPE geo_deliveries_unacked gauge",
        "# TYPE geo_messages_consumed_total counter",
    ):
        assert line in text
