"""Fixtures of the integration tests that need more than a fresh vhost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.broker import BrokerAdmin
from tests.integration.deployment import Deployment, loaded_definitions


@pytest.fixture
def deployment(broker_admin: BrokerAdmin) -> Iterator[Deployment]:
    """deploy/rabbitmq/definitions.json on its own vhost, with its users (renamed)."""
    with loaded_definitions(broker_admin) as loaded:
        yield loaded
