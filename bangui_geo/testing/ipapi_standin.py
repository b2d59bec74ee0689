"""An ip-api.com stand-in for tests and the benchmark: the batch endpoint with the limits ip-api
documents.

It answers ``POST /batch`` as ip-api does (422 above 100 entries, a fixed request window with
``X-Rl``/``X-Ttl`` on every answer, 429 past the budget, ``status: fail`` for private, reserved and
junk queries), can be switched into an outage, and records every request so tests can assert on
the client's behaviour. Public IPs get a deterministic answer (country from ``iptocc``) so results
are checkable. ``IpApiStandIn`` runs on the caller's loop; ``ThreadedStandIn`` on its own thread,
for tests whose services run as subprocesses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any

import iptocc
import pycountry
from aiohttp import web

from services.resolver.geo import Geo
from shared.messages import Resolution

MAX_BATCH = 100
PRIVATE_NETS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


class Outage(StrEnum):
    NONE = "none"
    UNAVAILABLE = "503"  # a 503 from the load balancer: no rate headers
    DROP = "drop"  # the connection is closed without an answer
    GARBAGE = "garbage"  # 200 with a body that is not the JSON answer
    HANG = "hang"  # no answer for ``hang_s`` seconds (the client times out first)


@dataclass(frozen=True)
class Recorded:
    at: float  # time.monotonic() when the request arrived
    ips: tuple[str, ...]
    status: int  # 0 when the connection was dropped
    remaining: int | None  # X-Rl sent back
    ttl: float | None  # X-Ttl sent back


def _country_name(code: str) -> str:
    country = pycountry.countries.get(alpha_2=code)
    return str(country.name) if country is not None else code


def answer_for(query: str, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the stand-in says about one query, with every field the client may ask for."""
    if overrides and query in overrides:
        return {"status": "fail", "message": overrides[query], "query": query}
    try:
        address = ipaddress.ip_address(query)
    except ValueError:
        return {"status": "fail", "message": "invalid query", "query": query}
    if any(address in net for net in PRIVATE_NETS):
        return {"status": "fail", "message": "private range", "query": query}
    if not address.is_global or address.is_multicast:
        return {"status": "fail", "message": "reserved range", "query": query}
    code = iptocc.country_code(str(address)) or ""
    n = int(address) % 64_512 + 1
    plain = n % 10 == 0  # one in ten has no AS or org, as happens with ip-api
    return {
        "status": "success",
        "countryCode": code,
        "country": _country_name(code) if code else "",
        "as": "" if plain else f"AS{n} Example Net",
        "org": "" if plain else f"Org {n}",
        "query": query,
    }


def expected_geo(ip: str, overrides: Mapping[str, str] | None = None) -> Geo | None:
    """What the client should make of the stand-in's answer (None: left out, retried later)."""
    answer = answer_for(ip, overrides)
    if answer["status"] == "fail":
        final = answer["message"] in ("private range", "reserved range", "invalid query")
        return Geo(None, None, None, None, Resolution.REJECTED, "ip-api") if final else None
    if not answer["countryCode"]:
        return None
    return Geo(
        answer["countryCode"],
        answer["country"],
        answer["as"].split()[0] if answer["as"] else None,
        answer["org"] or None,
        Resolution.RESOLVED,
        "ip-api",
    )


@dataclass
class IpApiStandIn:
    """The server; ``async with IpApiStandIn(...) as api`` serves it on ``api.url``."""

    requests_per_window: int = 15
    window: float = 60.0
    integer_ttl: bool = True  # ip-api sends whole seconds; fractions make short windows precise
    overrides: dict[str, str] = field(default_factory=dict)  # query -> forced fail message
    hang_s: float = 30.0
    outage: Outage = Outage.NONE
    records: list[Recorded] = field(default_factory=list)
    _window_end: float = field(default=-math.inf, init=False)
    _used: int = field(default=0, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/batch", self._batch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> IpApiStandIn:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def exhaust(self) -> None:
        """Use up the current window, as another client behind the same address would."""
        self._count(time.monotonic(), self.requests_per_window)

    # -- what tests assert on ----------------------------------------------------------------

    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    def answered(self) -> list[Recorded]:
        return [r for r in self.records if r.status == 200]

    def ips_sent(self) -> list[str]:
        return [ip for r in self.records for ip in r.ips]

    def average_batch(self) -> float:
        sizes = [len(r.ips) for r in self.records]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def ttl_violations(self) -> list[tuple[Recorded, Recorded]]:
        """Requests that arrived before an earlier ``X-Rl: 0`` answer's ``X-Ttl`` had passed."""
        out = []
        for i, sent in enumerate(self.records):
            if sent.remaining == 0 and sent.ttl is not None:
                out += [
                    (sent, later)
                    for later in self.records[i + 1 :]
                    if later.at < sent.at + sent.ttl
                ]
        return out

    # -- the endpoint --------------------------------------------------------------------------

    def _count(self, now: float, requests: int = 1) -> tuple[bool, int, float]:
        if now >= self._window_end:
            self._window_end, self._used = now + self.window, 0
        self._used += requests
        ttl = self._window_end - now
        shown = float(math.ceil(ttl)) if self.integer_ttl else round(ttl, 3)
        return self._used <= self.requests_per_window, self.requests_per_window - self._used, shown

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        queries = tuple(
            str(e.get("query", "")) if isinstance(e, dict) else str(e)
            for e in (body if isinstance(body, list) else [])
        )

        def record(status: int, remaining: int | None = None, ttl: float | None = None) -> None:
            self.records.append(Recorded(now, queries, status, remaining, ttl))

        if self.outage is Outage.UNAVAILABLE:
            record(503)
            return web.Response(status=503, text="Service Unavailable")
        if self.outage is Outage.DROP:
            record(0)
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=503)  # never reaches the client
        if self.outage is Outage.HANG:
            record(0)
            await asyncio.sleep(self.hang_s)
            return web.Response(status=503)
        allowed, left, ttl = self._count(now)
        remaining = max(0, left)
        headers = {"X-Rl": str(remaining), "X-Ttl": f"{ttl:g}"}
        if not allowed:
            record(429, remaining, ttl)
            return web.Response(status=429, headers=headers, text="Too Many Requests")
        if not isinstance(body, list):
            record(400, remaining, ttl)
            return web.Response(status=400, headers=headers, text="bad request")
        if len(queries) > MAX_BATCH:
            record(422, remaining, ttl)
            return web.Response(status=422, headers=headers, text="too many queries")
        if self.outage is Outage.GARBAGE:
            record(200, remaining, ttl)
            return web.Response(status=200, headers=headers, text="<html>oops</html>")
        record(200, remaining, ttl)
        fields = request.query.get("fields")
        answers = [answer_for(q, self.overrides) for q in queries]
        if fields:
            keep = set(fields.split(","))
            answers = [{k: v for k, v in a.items() if k in keep} for a in answers]
        return web.json_response(answers, headers=headers)


class ThreadedStandIn:
    """``IpApiStandIn`` on its own loop and thread, so it serves while the test blocks."""

    def __init__(self, api: IpApiStandIn) -> None:
        self.api = api
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.api.url

    def set_outage(self, outage: Outage) -> None:
        self._loop.call_soon_threadsafe(setattr, self.api, "outage", outage)

    def records(self) -> list[Recorded]:
        return list(self.api.records)

    def __enter__(self) -> ThreadedStandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.api.start(), self._loop).result(timeout=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.api.stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
