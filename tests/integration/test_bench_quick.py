"""Keeps the benchmark working: ``python -m bench --quick`` against the test broker must finish,
print every figure line with a result label, and write the JSON. Timings are never asserted (a
MISS is a fine outcome here); only a scenario that could not run fails the test."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from bangui_geo.testing.broker import BrokerAdmin
from tests.integration.bench_run import LABELS, run_bench

pytestmark = pytest.mark.integration

FIGURES = (
    "single_ip_drain",
    "bulk_drain",
    "persistence_upsert",
    "commits_per_upsert",
    "resolver_memory",
    "ipapi_batch_fill",
    "e2e_latency_p50",
    "e2e_latency_p99",
    "commits_per_flush",
    "agent_backfill",
    "agent_ban_delay_p50",
    "agent_ban_delay_p99",
    "lookup_p50",
    "lookup_p99",
    "lookup_concurrent",
    "warm_first_served",
    "warm_all_known",
    "warm_resolver_rss",
)


def test_quick_benchmark_prints_every_figure(broker_admin: BrokerAdmin, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(broker_admin, "--quick", "--json", str(out))
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    for key in FIGURES:
        line = re.compile(rf"^{key}\s.*\s{LABELS}$", re.MULTILINE)
        assert line.search(result.stdout), f"no result line for {key}:\n{printed}"
    for header in (r"mode\s+quick", r"date\s+\d{4}-", r"cpu\s+\S", r"rabbitmq\s+\S"):
        assert re.search(rf"^\s+{header}", result.stdout, re.MULTILINE), f"header {header}"
    document = json.loads(out.read_text())
    assert [f["key"] for f in document["figures"]] == list(FIGURES)
    assert all(f["label"] != "ERROR" for f in document["figures"])
    vhosts = re.search(r"vhosts\s+(\S+)\*", result.stdout)
    assert vhosts is not None
    assert not _vhosts_with_prefix(broker_admin, vhosts.group(1)), "the run's vhosts are deleted"


def test_profile_writes_a_flame_graph_per_service(
    broker_admin: BrokerAdmin, tmp_path: Path
) -> None:
    """``--profile`` is how the drain optimizations were found: keep it working."""
    result = run_bench(
        broker_admin, "--quick", "--only", "bulk", "--profile", "--workdir", str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "profiled (py-spy, figures not comparable)" in result.stdout
    for service in ("resolver", "timer", "persistence"):
        graph = tmp_path / "bulk" / f"{service}.profile.svg"
        assert graph.exists(), f"no flame graph for {service}:\n{result.stdout}"
        text = graph.read_text()
        assert "<svg" in text
        assert f"services/{service}/" in text  # samples of the service's own code


def _vhosts_with_prefix(admin: BrokerAdmin, prefix: str) -> list[str]:
    """Vhosts whose name starts with ``prefix`` (management API, or rabbitmqctl without it)."""
    if admin.api_available():
        request = urllib.request.Request(admin.management_url + "/api/vhosts")
        token = base64.b64encode(f"{admin.user}:{admin.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            names = [str(v["name"]) for v in json.load(response)]
    else:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            return []
        listing = subprocess.run(
            [ctl, "list_vhosts", "-q"], capture_output=True, text=True, check=True
        )
        names = listing.stdout.split()
    return [n for n in names if n.startswith(prefix)]
