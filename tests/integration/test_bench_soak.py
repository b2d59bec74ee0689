"""Keeps the soak working in CI at its quick length: ``python -m bench --quick --only soak``
must sample every service's RSS, print a growth figure for each, and store a row for every IP it
published. The growth itself is not asserted (a short run is mostly warm-up); the half-hour
figures are in README's *Performance*."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bangui_geo.testing.broker import BrokerAdmin
from tests.integration.bench_run import LABELS, run_bench

pytestmark = pytest.mark.integration

SOAK_FIGURES = (
    "soak_rss_resolver",
    "soak_rss_persistence",
    "soak_rss_timer",
    "soak_rss_standby",
    "soak_rows",
)


def test_quick_soak_samples_every_service_and_stores_every_ip(
    broker_admin: BrokerAdmin, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    result = run_bench(broker_admin, "--quick", "--only", "soak", "--json", str(out))
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    for key in SOAK_FIGURES:
        line = re.compile(rf"^{key}\s.*\s{LABELS}$", re.MULTILINE)
        assert line.search(result.stdout), f"no result line for {key}:\n{printed}"
    figures = {f["key"]: f for f in json.loads(out.read_text())["figures"]}
    assert list(figures) == list(SOAK_FIGURES)
    for key in SOAK_FIGURES[:-1]:
        assert figures[key]["project"] is not None, figures[key]
        assert figures[key]["metrics"]["samples"] >= 10, figures[key]
    rows = figures["soak_rows"]
    assert rows["label"] == "PASS", rows
    assert rows["metrics"]["rows"] == rows["metrics"]["distinct_ips"] > 0
    assert rows["metrics"]["published"] > rows["metrics"]["distinct_ips"], "IPs were repeated"
    assert rows["metrics"]["errors"] == 0, rows["details"]
    assert "exit codes {'standby': 0, 'timer': 0, 'resolver': 0, 'persistence': 0}" in printed
