"""Figure 5: how full the ip-api batches are under a burst, against the ip-api stand-in.

The ip-api free tier allows 15 requests of 100 IPs a minute, so every request sent with fewer than
100 IPs wastes budget. A burst of single-IP ``ip.seen`` messages (the hard case: one lookup per
message) is pre-filled, then the real resolver starts with ``GEO_PROVIDER=ip-api`` pointed at
``bangui_geo.testing.ipapi_standin`` (the tests' stand-in) with a short window (same 15 requests,
1 s instead of 60 s), and the stand-in's request log gives the average IPs per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from bangui_geo.testing import ServiceFailed, event_time, public_ips
from bangui_geo.testing.ipapi_standin import IpApiStandIn, ThreadedStandIn
from bench.broker import prefill
from bench.ips import single_bodies
from bench.report import Figure, Target
from bench.services import Services

MAX_BATCH = 100
REQUESTS_PER_WINDOW = 15
WINDOW_S = 1.0


async def run_ipapi(burst: int, amqp_url: str, workdir: Path) -> Figure:
    figure = Figure(
        "ipapi_batch_fill",
        f"5. ip-api batch fill under a burst of {burst:,} single-IP messages "
        f"(stand-in: {REQUESTS_PER_WINDOW} requests / {WINDOW_S:g} s window)",
        "% full",
        Target("value>=", 90),
        baseline_is=f"ideal: every request carries {MAX_BATCH} IPs",
    )
    ips = public_ips(burst, seed=5)
    await prefill(amqp_url, single_bodies(ips))
    services = Services(amqp_url, workdir / "geo_cache.sqlite3", workdir)
    deadline_s = 30 + 3 * burst / (MAX_BATCH * REQUESTS_PER_WINDOW / WINDOW_S)
    api = IpApiStandIn(requests_per_window=REQUESTS_PER_WINDOW, window=WINDOW_S, integer_ttl=False)
    with ThreadedStandIn(api) as server:
        try:
            services.start(
                "resolver",
                GEO_PROVIDER="ip-api",
                GEO_IPAPI_URL=server.url,
                GEO_IPAPI_REQUESTS_PER_WINDOW=str(REQUESTS_PER_WINDOW),
                GEO_IPAPI_WINDOW=str(WINDOW_S),
            )
            ready = await asyncio.to_thread(services.wait_event, "resolver", "resolver_ready")
            wanted = set(ips)
            deadline = time.monotonic() + deadline_s
            while not wanted.issubset(ip for r in server.records() for ip in r.ips):
                services.check_running()
                if time.monotonic() > deadline:
                    raise ServiceFailed(
                        f"the stand-in did not see all {burst} IPs in {deadline_s}s"
                    )
                await asyncio.sleep(0.05)
            finished = time.time()
            codes = await asyncio.to_thread(services.stop_all)
        finally:
            services.kill_all()
        records = server.records()

    sizes = [len(r.ips) for r in records if r.ips]
    statuses = Counter(r.status for r in records)
    answered = [len(r.ips) for r in records if r.status == 200]
    average = sum(sizes) / len(sizes)
    figure.project = 100 * average / MAX_BATCH
    figure.baseline = 100.0
    seconds = finished - event_time(ready)
    figure.metrics.update(
        requests=len(sizes),
        average_ips=average,
        smallest=min(sizes),
        rate_limited=statuses.get(429, 0),
        seconds_after_ready=seconds,
    )
    figure.details += [
        f"{len(sizes)} requests for {burst:,} IPs (ideal {-(-burst // MAX_BATCH)}); "
        f"average {average:.1f} IPs per request; smallest {min(sizes)}; "
        f"statuses {dict(sorted(statuses.items()))}",
        f"answered requests average {sum(answered) / max(len(answered), 1):.1f} IPs; "
        f"burst sent in {seconds:.1f} s after resolver_ready; exit codes {codes}",
    ]
    return figure
