"""Fixtures of the container lane: a settings file for the services (a 1 s flush, so a stream
lands in seconds) and the figures the lane prints at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Filled by the tests, printed after the run: IPs published, rows, containers killed, lost.
FIGURES: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="session")
def lane_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lane") / "geo.env"
    path.write_text(
        "# The container lane's settings for every service container (BANGUI_GEO_ENV_FILE).\n"
        "GEO_FLUSH_INTERVAL=1\n"
        "GEO_RE_RESOLVE_INTERVAL=600\n"
        "GEO_LOG_FORMAT=json\n"
    )
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    if out := os.environ.get("GEO_LANE_FIGURES"):  # scripts/container-lane's summary
        with open(out, "a") as figures:
            for stack, values in FIGURES.items():
                figures.write(json.dumps({"stack": stack, **values}) + "\n")
    terminalreporter.section("container lane figures")
    for stack, figures in FIGURES.items():
        line = ", ".join(f"{key} {value}" for key, value in figures.items())
        terminalreporter.write_line(f"{stack}: {line}")
