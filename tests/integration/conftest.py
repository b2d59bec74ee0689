"""Integration fixtures beside the broker's: the services of a test (``service_group``), the
deployment's definitions on a vhost of their own, a fresh PostgreSQL database per test, and a
tap on the timer's ``geo.flush`` commands."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import aio_pika
import aio_pika.abc
import pytest

from bangui_geo.testing import ServiceGroup, events
from bangui_geo.testing.amqp import FlushTap
from bangui_geo.testing.broker import BrokerAdmin
from bangui_geo.testing.postgres import (
    TRUST_IGNORED_PASSWORD as PG_PASSWORD,
)
from bangui_geo.testing.postgres import PostgresUnavailable, fresh_database, with_password
from tests.integration.deployment import Deployment, loaded_definitions


@pytest.fixture
def service_group(amqp_url: str, tmp_path: Path) -> Iterator[ServiceGroup]:
    """The test's services on its own vhost and ``tmp_path/geo_cache.sqlite3``, logs in
    ``tmp_path``; whatever still runs at the end is killed."""
    group = ServiceGroup(amqp_url, tmp_path / "geo_cache.sqlite3", tmp_path)
    try:
        yield group
    finally:
        group.kill_all()


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


@pytest.fixture
async def flush_tap(amqp_url: str) -> AsyncIterator[FlushTap]:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("bangui", "topic", durable=True)
    queue = await channel.declare_queue("test.flush_tap", exclusive=True)
    await queue.bind(exchange, "geo.flush")
    tap = FlushTap()
    await queue.consume(tap.on_message)
    yield tap
    await connection.close()


@pytest.fixture
def pg_service_group(service_group: ServiceGroup, pg_url: str) -> Iterator[ServiceGroup]:
    """``service_group`` with ``geo_cache`` in PostgreSQL (``GEO_DB_URL``, with a password that
    no log may show, and no SQLite file written beside it)."""
    service_group.env["GEO_DB_URL"] = with_password(pg_url)
    yield service_group
    service_group.kill_all()
    for process in service_group.started:
        assert PG_PASSWORD not in process.log_path.read_text(errors="replace")
    for process in service_group.started:
        if process.name == "persistence" and (ready := events(process, "persistence_ready")):
            assert ready[0]["store"] == "postgres"
            assert ready[0]["db"].startswith("postgresql://postgres:***@")
    assert not service_group.db_path.exists(), "a SQLite file was written beside GEO_DB_URL"


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest) -> ServiceGroup:
    """``service_group`` on SQLite, then ``pg_service_group``: one test for both stores."""
    group: ServiceGroup = request.getfixturevalue(
        "service_group" if request.param == "sqlite" else "pg_service_group"
    )
    return group


@pytest.fixture
def clean_cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GEO_* setting of the caller's environment reaches an in-process CLI call, and the CLI
    leaves logging as pytest set it."""
    from services.cli import main as cli

    for name in list(os.environ):
        if name.startswith("GEO_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
