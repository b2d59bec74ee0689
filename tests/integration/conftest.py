"""Integration fixtures beside the broker's: a fresh PostgreSQL database per test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.postgres import PostgresUnavailable, fresh_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_database())
        except PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url
