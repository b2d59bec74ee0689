"""Fixtures the unit tests share: docker-compose.yml as written (the deployment file tests)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.compose_files import load_raw_compose


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_raw_compose()
