"""Figure 4: bytes of RSS per cached IP in the resolver's ``GeoCache``, each side measured in a
fresh interpreter (``bench.memory_probe``) so nothing else this run allocated is counted."""

from __future__ import annotations

import json
import subprocess
import sys

from bangui_geo.testing import REPO_ROOT
from bench.report import Figure, Target


def probe(kind: str, count: int) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory_probe", kind, str(count)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed: {result.stderr.strip()[-500:]}")
    data: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def run_memory(count: int) -> Figure:
    figure = Figure(
        "resolver_memory",
        f"4. RSS growth per cached IP, GeoCache holding {count:,} flushed IPs",
        "B/IP",
        Target("value<=", 200),
        baseline_is=f"plain dict of the same {count:,} IP strings -> None (context only)",
    )
    cache = probe("cache", count)
    plain = probe("dict", count)
    for data in (cache, plain):
        if data["entries"] != count:
            raise RuntimeError(f"{data['kind']} probe holds {data['entries']} of {count} IPs")
    cache_growth = cache["rss_after"] - cache["rss_before"]
    dict_growth = plain["rss_after"] - plain["rss_before"]
    figure.project = cache_growth / count
    figure.baseline = dict_growth / count
    figure.metrics.update(cache_growth_bytes=cache_growth, dict_growth_bytes=dict_growth)
    figure.details.append(
        f"VmRSS growth: GeoCache {cache_growth / 2**20:.1f} MiB, "
        f"dict {dict_growth / 2**20:.1f} MiB (after gc.collect(), a fresh interpreter each; "
        f"the IP strings count on both sides)"
    )
    return figure
