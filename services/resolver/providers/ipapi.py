"""The ``ip-api`` provider: ip-api.com's batch endpoint, shared by every concurrent lookup.

The free tier allows 15 batch requests of 100 IPs a minute and bans addresses that keep breaking
the limit, so ``lookup()`` calls do not send requests themselves: they queue their IPs, and one
dispatcher task sends full batches (or what has lingered briefly) only when ``RequestBudget``
allows. Nothing raises into the resolver: an IP the request failed for is simply left out, so
the resolver stores it as a negative and re-resolve retries it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache, partial

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.resolver.geo import Geo
from services.resolver.providers.ratelimit import Backoff, RequestBudget
from shared.ipnorm import is_routable, normalize_ip
from shared.messages import COUNTRY_CODES, Resolution, clean_asn, clean_text
from shared.metrics import MetricsRegistry
from shared.settings import Settings

NAME = "ip-api"
MAX_BATCH = 100  # ip-api answers 422 to a larger batch
FIELDS = "status,message,query,countryCode,country,as,org"
# ip-api's final "no": the address will never resolve, so re-resolve must not retry it.
FINAL_FAILURES = frozenset({"private range", "reserved range", "invalid query"})
REJECTED = Geo(None, None, None, None, Resolution.REJECTED, NAME)


class IpApiAnswer(BaseModel):
    """One element of the batch response, restricted to the ``fields`` we ask for."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: str
    query: str = ""
    message: str | None = None
    country_code: str | None = Field(default=None, alias="countryCode")
    country: str | None = None
    as_: str | None = Field(default=None, alias="as")
    org: str | None = None


_BATCH_ANSWER = TypeAdapter(list[IpApiAnswer])


@lru_cache(maxsize=4096)
def _resolved(code: str, country: str | None, asn: str | None, org: str | None) -> Geo:
    return Geo(code, country, asn, org, Resolution.RESOLVED, NAME)


def _asn(as_field: str | None) -> str | None:
    """``"AS15169 Google LLC"`` -> ``"AS15169"``; anything else -> None."""
    parts = (as_field or "").split(maxsplit=1)
    return clean_asn(parts[0]) if parts else None


def to_geo(answer: IpApiAnswer) -> Geo | None:
    """The answer as a ``Geo``, or None when it says nothing final (so the IP is retried)."""
    if answer.status == "success":
        code = (answer.country_code or "").strip().upper()
        if code not in COUNTRY_CODES:  # persistence refuses anything else
            return None
        return _resolved(code, clean_text(answer.country), _asn(answer.as_), clean_text(answer.org))
    if answer.status == "fail" and answer.message in FINAL_FAILURES:
        return REJECTED
    return None


def parse_batch(sent: Sequence[str], body: bytes) -> dict[str, Geo]:
    """Map a batch response onto the IPs sent; raise ``ValueError`` when it is not one."""
    try:
        answers = _BATCH_ANSWER.validate_json(body)
    except ValidationError as exc:
        raise ValueError(f"malformed ip-api answer: {exc.error_count()} errors") from None
    wanted = set(sent)
    out: dict[str, Geo] = {}
    for answer in answers:
        ip = answer.query
        if ip not in wanted:
            try:
                ip = normalize_ip(ip)
            except ValueError:
                continue
            if ip not in wanted:
                continue
        geo = to_geo(answer)
        if geo is not None:
            out[ip] = geo
    return out


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


def _lookupable(ips: Iterable[str]) -> tuple[list[str], int]:
    """Distinct routable IPs of ``ips``, and how many others were dropped (the resolver already
    filters them; this keeps a private address from ever leaving the process regardless)."""
    out: list[str] = []
    dropped = 0
    for ip in dict.fromkeys(ips):
        try:
            routable = is_routable(ip)
        except ValueError:
            routable = False
        if routable:
            out.append(ip)
        else:
            dropped += 1
    return out, dropped


@dataclass
class IpApiStats:
    requests: int = 0
    ips_sent: int = 0
    answered: int = 0
    failed_requests: int = 0
    rate_limited: int = 0
    failed_fast: int = 0
    expired: int = 0
    latency_s: float = 0.0  # summed over requests that got a response, for /metrics


class IpApiProvider:
    """ip-api batch client: coalesces concurrent lookups, paces requests, backs off on failure.

    While backing off after a failed request the provider fails fast (answers nothing, sends
    nothing) until the backoff ends; the next queued IPs then probe the server. While only the
    rate budget holds a request back, IPs wait in the queue, at most ``max_wait`` seconds.
    """

    name = NAME

    def __init__(
        self,
        base_url: str,
        *,
        requests_per_window: int = 15,
        window: float = 60.0,
        timeout: float = 10.0,
        max_wait: float = 300.0,
        linger: float = 0.1,
        batch_size: int = MAX_BATCH,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        self._url = f"{base_url.rstrip('/')}/batch?fields={FIELDS}"
        self._window = window
        self._timeout = timeout
        self._max_wait = max_wait
        self._linger = linger
        self._batch_size = batch_size
        self._budget = RequestBudget(requests_per_window, window, margin=min(1.0, window / 20))
        self._backoff = backoff or Backoff(base=min(1.0, window / 4), cap=window)
        self._clock = clock
        self._jitter = jitter
        self._failing_until = -1.0
        self._queue: OrderedDict[str, float] = OrderedDict()  # waiting to be sent -> queued at
        self._pending: dict[str, asyncio.Future[Geo | None]] = {}  # queued or in flight
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.stats = IpApiStats()
        self._log: structlog.typing.FilteringBoundLogger = structlog.get_logger(
            "resolver", provider=NAME
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> IpApiProvider:
        return cls(
            settings.ipapi_url,
            requests_per_window=settings.ipapi_requests_per_window,
            window=settings.ipapi_window,
            timeout=settings.ipapi_timeout,
            max_wait=settings.ipapi_max_wait,
        )

    async def lookup(self, ips: Sequence[str]) -> Mapping[str, Geo]:
        wanted, dropped = _lookupable(ips)
        if dropped:
            self._log.warning("ipapi_non_global_dropped", ips=dropped)
        if not wanted or self._closed:
            return {}
        now = self._clock()
        if now < self._failing_until:
            self.stats.failed_fast += len(wanted)
            self._log.debug(
                "ipapi_lookups_failed_fast",
                ips=len(wanted),
                backoff_left_s=round(self._failing_until - now, 3),
            )
            return {}
        self._start()
        futures: dict[str, asyncio.Future[Geo | None]] = {}
        before = len(self._queue)
        loop = asyncio.get_running_loop()
        for ip in wanted:
            future = self._pending.get(ip)
            if future is None:
                future = self._pending[ip] = loop.create_future()
                self._queue[ip] = now
            futures[ip] = future
        after = len(self._queue)
        if (before == 0 and after) or before < self._batch_size <= after:
            self._wakeup.set()
        # asyncio.wait, not gather: a cancelled caller must not cancel futures others share.
        await asyncio.wait(futures.values())
        return {ip: geo for ip, f in futures.items() if (geo := f.result()) is not None}

    def register_metrics(self, registry: MetricsRegistry) -> None:
        stats = self.stats
        for field_name, help_ in (
            ("requests", "Batch requests sent to ip-api."),
            ("ips_sent", "IPs sent to ip-api."),
            ("answered", "IPs ip-api answered."),
            ("failed_requests", "Requests that failed (5xx, timeout, connection, bad JSON)."),
            ("rate_limited", "429 answers: the client broke the documented limit."),
            ("failed_fast", "IPs answered as unknown while backing off."),
            ("expired", "IPs that waited longer than GEO_IPAPI_MAX_WAIT."),
        ):
            registry.counter(
                f"geo_ipapi_{field_name}_total", help_, partial(getattr, stats, field_name)
            )
        registry.counter(
            "geo_ipapi_request_seconds_sum",
            "Time spent in answered requests.",
            partial(getattr, stats, "latency_s"),
        )

    async def close(self) -> None:
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        self._answer(list(self._pending), {})
        self._queue.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._log.info("ipapi_provider_closed", **asdict(self.stats))

    # -- dispatcher ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": "bangui-geo"},
            )
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="ipapi-dispatcher")
            self._dispatcher.add_done_callback(self._dispatcher_done)

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("ipapi_dispatcher_crashed", error=repr(exc))
        self._answer(list(self._queue), {})  # nobody will send them now; the next lookup restarts

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = self._clock()
            self._expire(now)
            if now < self._failing_until:
                self.stats.failed_fast += len(self._queue)
                self._answer(list(self._queue), {})
                continue
            if not self._queue:
                continue
            oldest = next(iter(self._queue.values()))
            ready = now if len(self._queue) >= self._batch_size else oldest + self._linger
            send_at = max(self._budget.next_allowed(now), ready)
            if send_at > now:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(send_at, oldest + self._max_wait) - now):
                        await self._wakeup.wait()
                continue
            take = min(self._batch_size, len(self._queue))
            batch = [self._queue.popitem(last=False)[0] for _ in range(take)]
            answers: dict[str, Geo] = {}
            try:
                answers = await self._send(batch)
            finally:
                self._answer(batch, answers)

    def _expire(self, now: float) -> None:
        expired = []
        while self._queue:
            ip, queued_at = next(iter(self._queue.items()))
            if now - queued_at < self._max_wait:
                break
            del self._queue[ip]
            expired.append(ip)
        if expired:
            self.stats.expired += len(expired)
            self._log.warning("ipapi_lookups_expired", ips=len(expired), max_wait_s=self._max_wait)
            self._answer(expired, {})

    def _answer(self, ips: Iterable[str], answers: Mapping[str, Geo]) -> None:
        for ip in ips:
            self._queue.pop(ip, None)
            future = self._pending.pop(ip, None)
            if future is not None and not future.done():
                future.set_result(answers.get(ip))

    # -- one request -----------------------------------------------------------------------

    async def _send(self, batch: list[str]) -> dict[str, Geo]:
        assert self._session is not None
        sent_at = self._clock()
        self._budget.record_sent(sent_at)
        self.stats.requests += 1
        self.stats.ips_sent += len(batch)
        try:
            async with self._session.post(self._url, json=batch) as response:
                status = response.status
                headers = response.headers
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(batch, error=repr(exc) or type(exc).__name__)
            return {}
        now = self._clock()
        self.stats.latency_s += now - sent_at
        rl = _header_number(headers, "X-Rl")
        remaining = None if rl is None else int(rl)
        ttl = _header_number(headers, "X-Ttl")
        self._budget.observe(now, remaining, ttl)
        if status == 429:
            wait = ttl if ttl is not None else self._window
            self._budget.block_until(now + wait)
            self.stats.rate_limited += 1
            self._log.error("ipapi_rate_limited", ips=len(batch), ttl=ttl, blocked_s=wait)
            return {}
        if status != 200:
            self._failed(batch, status=status)
            return {}
        try:
            answers = parse_batch(batch, body)
        except ValueError as exc:
            self._failed(batch, status=status, error=str(exc))
            return {}
        self._backoff.succeeded()
        self.stats.answered += len(answers)
        self._log.info(
            "ipapi_batch_sent",
            ips=len(batch),
            answered=len(answers),
            remaining=remaining,
            ttl=ttl,
            duration_ms=round((now - sent_at) * 1000, 1),
        )
        if remaining is not None and remaining <= 0:
            self._log.info("ipapi_rate_budget_exhausted", ttl=ttl)
        return answers

    def _failed(self, batch: Sequence[str], *, status: int | None = None, error: str = "") -> None:
        now = self._clock()
        delay = self._backoff.failed(self._jitter())
        self._failing_until = now + delay
        self._budget.block_until(self._failing_until)
        self.stats.failed_requests += 1
        self._log.warning(
            "ipapi_request_failed",
            ips=len(batch),
            status=status,
            error=error,
            failures=self._backoff.failures,
            backoff_s=round(delay, 3),
        )
