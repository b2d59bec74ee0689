"""How the benchmark's tests run it: ``python -m bench ARGS`` against the test broker, as a user
runs it, and the result labels a figure line ends with."""

from __future__ import annotations

import os
import subprocess
import sys

from bangui_geo.testing import REPO_ROOT
from bangui_geo.testing.broker import BrokerAdmin

LABELS = r"(PASS|MISS|INFO|not measured \(stand-in not available\))"


def run_bench(admin: BrokerAdmin, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench ARGS`` against the test broker, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    env.update(
        GEO_BENCH_AMQP_URL=admin.amqp_url,
        GEO_BENCH_MANAGEMENT_URL=admin.management_url,
        PYTHONUNBUFFERED="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
