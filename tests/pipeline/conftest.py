"""One test at two speeds: each pipeline test runs on the in-memory broker in the fast lane, and
the very same body against a real RabbitMQ vhost under the ``integration`` marker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pipeline.harness import InMemory, Pipeline, RabbitMq


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pipeline]:
    if request.param == "memory":
        broker: InMemory | RabbitMq = InMemory()
    else:
        broker = RabbitMq(request.getfixturevalue("amqp_url"))
    pipe = Pipeline(broker, tmp_path)
    try:
        yield pipe
    finally:
        await pipe.kill_all()
