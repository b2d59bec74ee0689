"""Run in a fresh interpreter by figure 4: fill one structure with N cached IPs, print RSS growth.

``cache`` fills a ``GeoCache`` the way the resolver does in steady state (embedded-provider
answers put in chunks of 1000, flushed and confirmed every ``GEO_FLUSH_MAX_DIRTY``-sized batch so
nothing stays dirty); ``dict`` fills a plain ``{ip: None}`` with the same strings, for context.
Everything is imported and warmed up before the first reading, so only the structure is counted.
Usage: ``python -m bench.memory_probe cache|dict N``; prints one JSON object.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time

from bangui_geo.testing import iter_public_ips, public_ips
from services.resolver.cache import GeoCache
from services.resolver.geo import FAILED
from services.resolver.providers.embedded import EmbeddedProvider

CHUNK = 1000
FLUSH_EVERY = 20_000  # GEO_FLUSH_MAX_DIRTY's default
SALT = 4


def vm_rss() -> int:
    """This process's resident set in bytes, after a full collection."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def fill_cache(count: int) -> tuple[int, int, int]:
    provider = EmbeddedProvider()
    cache = GeoCache(max_entries=max(count * 2, 500_000), negative_ttl=300.0)
    warm = public_ips(CHUNK, seed=SALT + 1)  # not part of the measured IPs
    await provider.lookup(warm)
    del warm
    before = vm_rss()
    ips = iter_public_ips(count, seed=SALT)
    now = time.time()
    while True:
        chunk = [ip for _, ip in zip(range(CHUNK), ips, strict=False)]
        if not chunk:
            break
        answers = await provider.lookup(chunk)
        for ip in chunk:  # as the resolver does: no answer is a FAILED entry (negative TTL)
            cache.put(ip, answers.get(ip, FAILED), now)
        if cache.dirty_count >= FLUSH_EVERY:
            cache.confirm_flushed(cache.take_dirty())
    cache.confirm_flushed(cache.take_dirty())
    after = vm_rss()
    return before, after, len(cache)


def fill_dict(count: int) -> tuple[int, int, int]:
    before = vm_rss()
    table: dict[str, None] = {}
    for ip in iter_public_ips(count, seed=SALT):
        table[ip] = None
    after = vm_rss()
    return before, after, len(table)


def main(argv: list[str]) -> int:
    kind, count = argv[0], int(argv[1])
    if kind == "cache":
        before, after, entries = asyncio.run(fill_cache(count))
    elif kind == "dict":
        before, after, entries = fill_dict(count)
    else:
        raise SystemExit(f"unknown kind {kind!r}: cache or dict")
    print(json.dumps({"kind": kind, "rss_before": before, "rss_after": after, "entries": entries}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
