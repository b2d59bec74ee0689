"""The agent's loop: read a batch after the position, publish it, wait for the confirms, save
the new position, and poll again once caught up. The database is the buffer: while the broker
is away at most one batch is read ahead, so an outage of any length costs no memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog

from services.agent.link import BrokerLink, LinkSettings
from services.agent.position import (
    BanRow,
    Batch,
    Position,
    advance,
    group,
    lag_seconds,
)
from services.agent.source import (
    DatabaseBusy,
    DatabaseError,
    DatabaseMissing,
    ReadResult,
    newest_ban,
    read_bans,
)
from services.agent.statefile import save_state
from shared.metrics import Health, MetricsRegistry, serve_metrics
from shared.settings import Settings

SOURCE = "fail2ban"
Logger = structlog.typing.FilteringBoundLogger


@dataclass(frozen=True)
class AgentOptions:
    database: Path
    state: Path
    since: int | None  # epoch seconds: older bans are not published
    poll_interval: float
    batch_size: int
    link: LinkSettings


@dataclass
class AgentStatus:
    """Counters and the latest view of the database, read by ``/metrics``."""

    bans_read: int = 0
    ips_published: int = 0
    messages_published: int = 0
    bans_skipped: int = 0
    rewinds: int = 0
    files_replaced: int = 0
    confirmed: BanRow | None = None
    pending: BanRow | None = None
    newest: BanRow | None = None

    def lag(self) -> float:
        return lag_seconds(self.confirmed, self.newest, self.pending)


def agent_metrics(status: AgentStatus, link: BrokerLink) -> MetricsRegistry:
    registry = MetricsRegistry("agent")
    registry.counter(
        "geo_agent_bans_read_total",
        "Rows read from fail2ban's bans table.",
        lambda: status.bans_read,
    )
    registry.counter(
        "geo_agent_ips_published_total",
        "Addresses in ip.seen messages the broker confirmed.",
        lambda: status.ips_published,
    )
    registry.counter(
        "geo_agent_messages_published_total",
        "ip.seen messages the broker confirmed.",
        lambda: status.messages_published,
    )
    registry.counter(
        "geo_agent_bans_skipped_total",
        "Bans whose id is not an IP address (not published).",
        lambda: status.bans_skipped,
    )
    registry.counter(
        "geo_agent_rewinds_total",
        "Times the last published ban was gone or changed (purge, unban): re-read from its time.",
        lambda: status.rewinds,
    )
    registry.counter(
        "geo_agent_database_replaced_total",
        "Times the database file was another one: started over.",
        lambda: status.files_replaced,
    )
    registry.counter(
        "geo_agent_publish_failures_total",
        "Publish or connect attempts that failed (each is retried).",
        lambda: link.failures,
    )
    registry.gauge(
        "geo_agent_lag_seconds",
        "Seconds between fail2ban's newest ban and the last one the broker confirmed.",
        status.lag,
    )
    return registry


def bodies_of(batch: Batch) -> list[bytes]:
    """The ``ip.seen`` bodies of ``batch``, encoded directly: ``group`` already normalized the
    addresses and kept messages within the contract's 1000 (the client would check them again,
    doubling the agent's CPU per ban)."""
    return [
        json.dumps(
            {
                "ips": message.ips,
                "source": SOURCE,
                "jail": message.jail,
                "seen_at": _iso(message.seen_at),
            },
            separators=(",", ":"),
        ).encode()
        for message in batch.messages
    ]


def _health(link: BrokerLink) -> Health:
    if link.connected:
        return Health("ok")
    return Health("broker_disconnected", ("not connected to the broker",))


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


async def run_agent(
    options: AgentOptions, position: Position, settings: Settings, stop: asyncio.Event
) -> None:
    log = structlog.get_logger("agent")
    status = AgentStatus(confirmed=position.anchor)
    link = BrokerLink(options.link, stop, log)
    metrics = await serve_metrics(settings, agent_metrics(status, link), partial(_health, link))
    log.info(
        "agent_started",
        database=str(options.database),
        state=str(options.state),
        after_rowid=position.after_rowid,
        since=options.since,
    )
    try:
        async with asyncio.TaskGroup() as group_:
            helpers = [
                group_.create_task(_watch_newest(options, status, stop)),
                group_.create_task(link.keep_connected()),
            ]
            await _follow(options, position, status, link, stop, log)
            for helper in helpers:
                helper.cancel()
    finally:
        await link.close()
        if metrics is not None:
            await metrics.stop()
    log.info(
        "agent_stopped",
        bans_read=status.bans_read,
        ips_published=status.ips_published,
        messages=status.messages_published,
    )


@dataclass(frozen=True)
class Prepared:
    """A read and what it becomes: messages, their bodies, the position once confirmed."""

    result: ReadResult
    batch: Batch
    bodies: list[bytes]
    moved: Position
    seconds: float


def prepare(options: AgentOptions, position: Position) -> Prepared:
    """Read, group and encode the next batch; run in a thread, so that during a backfill the
    next batch is made while the broker confirms this one."""
    began = time.perf_counter()
    result = read_bans(options.database, position, options.batch_size)
    rows = result.rows
    wanted = (
        rows if options.since is None else [row for row in rows if row.timeofban >= options.since]
    )
    batch = group(wanted)
    return Prepared(
        result, batch, bodies_of(batch), advance(result.start, rows), time.perf_counter() - began
    )


async def _follow(
    options: AgentOptions,
    position: Position,
    status: AgentStatus,
    link: BrokerLink,
    stop: asyncio.Event,
    log: Logger,
) -> None:
    problem: str | None = None  # the last database problem logged, to log each one once
    ahead: asyncio.Task[Prepared] | None = None  # the next batch, read while confirming
    try:
        while not stop.is_set():
            try:
                if ahead is not None:
                    reading, ahead = ahead, None
                    prepared = await reading
                else:
                    prepared = await asyncio.to_thread(prepare, options, position)
            except DatabaseBusy as exc:
                log.debug("agent_database_busy", reason=str(exc))
                await _pause(stop, options.poll_interval)
                continue
            except DatabaseError as exc:
                if str(exc) != problem:
                    problem = str(exc)
                    event = (
                        "agent_database_missing"
                        if isinstance(exc, DatabaseMissing)
                        else "agent_database_unusable"
                    )
                    log.error(event, reason=problem)
                await _pause(stop, max(options.poll_interval, 1.0))
                continue
            if problem is not None:
                log.info("agent_database_readable", database=str(options.database))
                problem = None
            batch, rows = prepared.batch, prepared.result.rows
            _note_read(prepared, position, status, log, options.database)
            full = len(rows) == options.batch_size
            if full:  # a backfill: read on from where this batch ends, meanwhile
                ahead = asyncio.create_task(asyncio.to_thread(prepare, options, prepared.moved))
            began = time.perf_counter()
            if batch.messages and not await link.publish(prepared.bodies):
                return  # stopped before the confirms: the position stays where it was
            confirmed_s = time.perf_counter() - began
            if prepared.moved != position:
                await asyncio.to_thread(save_state, options.state, prepared.moved, options.database)
                position = prepared.moved
            status.confirmed = position.anchor
            status.pending = None
            if batch.messages:
                status.ips_published += batch.ip_count
                status.messages_published += len(batch.messages)
                log.info(
                    "agent_bans_published",
                    bans=len(rows),
                    ips=batch.ip_count,
                    messages=len(batch.messages),
                    through_rowid=rows[-1].rowid,
                    read_ms=round(1000 * prepared.seconds, 1),
                    confirm_ms=round(1000 * confirmed_s, 1),
                    save_ms=round(1000 * (time.perf_counter() - began - confirmed_s), 1),
                )
            if not full:
                await _pause(stop, options.poll_interval)
    finally:
        if ahead is not None:
            ahead.cancel()


def _note_read(
    prepared: Prepared, position: Position, status: AgentStatus, log: Logger, database: Path
) -> None:
    result = prepared.result
    status.newest = result.newest
    status.bans_read += len(result.rows)
    status.pending = result.rows[0] if result.rows else None
    if result.replaced:
        status.files_replaced += 1
        status.confirmed = None
        log.warning("agent_database_replaced", database=str(database))
    if result.rewound:
        status.rewinds += 1
        log.info(
            "agent_position_rewound",
            anchor_rowid=position.after_rowid,
            to_rowid=result.start.after_rowid,
        )
    for row in prepared.batch.skipped:
        log.warning("agent_ban_skipped", jail=row.jail, id=row.ip, reason="not an IP address")
    status.bans_skipped += len(prepared.batch.skipped)


async def _watch_newest(options: AgentOptions, status: AgentStatus, stop: asyncio.Event) -> None:
    """Keeps the lag gauge moving while a publish waits for the broker."""
    while not stop.is_set():
        newest = await asyncio.to_thread(newest_ban, options.database)
        if newest is not None:
            status.newest = newest
        await _pause(stop, max(options.poll_interval, 1.0))


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
