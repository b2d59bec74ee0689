"""Fixtures shared by unit and integration tests. Broker fixtures are only built when an
integration test asks for them, so ``pytest -m "not integration"`` needs no broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from bangui_geo.testing.broker import BrokerAdmin, BrokerUnavailable, start_broker

CONTAINER_TESTS = Path(__file__).parent / "container"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--container-lane",
        action="store_true",
        help="collect tests/container (docker compose end to end; scripts/container-lane)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/container needs a Docker engine and takes minutes: only scripts/container-lane
    (``--container-lane``) runs it; the main suite never collects it."""
    if collection_path == CONTAINER_TESTS and not config.getoption("--container-lane"):
        return True
    return None


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
