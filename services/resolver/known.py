"""What ``geo_cache`` already knows, learned over the broker: misses are asked of persistence
(``geo.known``) before any provider, so a restarted resolver or a new replica costs no lookup
and no row rewrite for an IP the table answers.

Concurrent deliveries' misses are coalesced: while ``max_in_flight`` questions are out, new
misses wait and go together in the next one (at most 1000 IPs), so a stream of single-IP
``ip.seen`` costs a few questions, not one per message. Nothing waits forever: no answer within
``timeout`` means "not known" (the providers answer; a duplicate upsert is harmless), and after
such a timeout the resolver stops asking for ``quiet_after_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog
from pydantic import ValidationError

from services.resolver.geo import Geo
from shared.messages import MAX_IPS_PER_MESSAGE, GeoRow, KnownRows, Resolution

Ask = Callable[[bytes, float], Awaitable[bytes | None]]  # (body, timeout) -> reply body or None


def known_answers(rows: Iterable[GeoRow]) -> list[tuple[str, Geo, str]]:
    """Rows as cache entries (ip, answer, cached_at); a ``failed`` row is no answer."""
    return [
        (
            row.ip,
            Geo(row.country_code, row.country_name, row.asn, row.org, row.resolution, row.provider),
            row.cached_at,
        )
        for row in rows
        if row.resolution is not Resolution.FAILED
    ]


def parse_reply(body: bytes) -> list[GeoRow] | None:
    try:
        return list(KnownRows.model_validate_json(body).rows)
    except ValidationError:
        return None


@dataclass
class KnownBatcher:
    ask: Ask
    timeout: float
    max_in_flight: int = 4
    quiet_after_timeout: float = 30.0
    clock: Callable[[], float] = field(default=lambda: asyncio.get_running_loop().time())
    asked: int = 0
    known: int = 0
    timeouts: int = 0
    _waiting: list[tuple[list[str], asyncio.Future[list[GeoRow]]]] = field(default_factory=list)
    _in_flight: int = 0
    _quiet_until: float = 0.0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger("resolver")
    )

    async def rows(self, ips: Sequence[str]) -> list[GeoRow]:
        """The final rows geo_cache holds for ``ips`` (empty when persistence is silent)."""
        if not ips or self.clock() < self._quiet_until:
            return []
        future: asyncio.Future[list[GeoRow]] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(ips), future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch: list[tuple[list[str], asyncio.Future[list[GeoRow]]]] = []
            size = 0
            while self._waiting and (
                not batch or size + len(self._waiting[0][0]) <= MAX_IPS_PER_MESSAGE
            ):
                ips, future = self._waiting.pop(0)
                batch.append((ips, future))
                size += len(ips)
            self._in_flight += 1
            task = asyncio.create_task(self._ask(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask(self, batch: list[tuple[list[str], asyncio.Future[list[GeoRow]]]]) -> None:
        try:
            ips = list(dict.fromkeys(ip for part, _ in batch for ip in part))
            rows: list[GeoRow] = []
            for start in range(0, len(ips), MAX_IPS_PER_MESSAGE):  # one delivery may hold 1000
                chunk = ips[start : start + MAX_IPS_PER_MESSAGE]
                found = await self._ask_once(chunk)
                if found is None:
                    break
                rows.extend(found)
            by_ip = {row.ip: row for row in rows}
            for part, future in batch:
                if not future.done():
                    future.set_result([by_ip[ip] for ip in dict.fromkeys(part) if ip in by_ip])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _ask_once(self, ips: list[str]) -> list[GeoRow] | None:
        body = json.dumps({"ips": ips}, separators=(",", ":")).encode()
        self.asked += len(ips)
        reply = await self.ask(body, self.timeout)
        rows = None if reply is None else parse_reply(reply)
        if rows is None:
            self.timeouts += 1
            self._quiet_until = self.clock() + self.quiet_after_timeout
            self.log.warning(
                "geo_known_unanswered",
                ips=len(ips),
                timeout_s=self.timeout,
                quiet_s=self.quiet_after_timeout,
                reply="none" if reply is None else "malformed",
            )
            return None
        self.known += len(rows)
        return rows
