"""Integration fixtures beside the broker's: the deployment's definitions on a vhost of their
own, and a fresh PostgreSQL database per test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.broker import BrokerAdmin
from tests.integration.deployment import Deployment, loaded_definitions
from tests.postgres import PostgresUnavailable, fresh_database


@pytest.fixture
def deployment(broker_admin: BrokerAdmin) -> Iterator[Deployment]:
    """deploy/rabbitmq/definitions.json on its own vhost, with its users (renamed)."""
    with loaded_definitions(broker_admin) as loaded:
        yield loaded


@pytest.fixture
def pg_url() -> Iterator[str]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_database())
        except PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url
