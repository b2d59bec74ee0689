"""Fixtures shared by unit and integration tests. Broker fixtures are only built when an
integration test asks for them, so ``pytest -m "not integration"`` needs no broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.broker import BrokerAdmin, BrokerUnavailable, start_broker


@pytest.fixture(scope="session")
def broker_admin() -> Iterator[BrokerAdmin]:
    with ExitStack() as stack:
        try:
            admin = start_broker(
                os.environ.get("GEO_TEST_AMQP_URL"),
                os.environ.get("GEO_TEST_MANAGEMENT_URL"),
                stack,
            )
        except BrokerUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        yield admin


@pytest.fixture
def amqp_url(broker_admin: BrokerAdmin) -> Iterator[str]:
    """A fresh vhost for this test, deleted afterwards: runs and tests never collide."""
    vhost = broker_admin.new_vhost()
    try:
        yield broker_admin.url_for(vhost)
    finally:
        broker_admin.delete_vhost(vhost)
