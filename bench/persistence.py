"""Figure 3: ``SqliteGeoRepository.upsert_many`` against bare ``sqlite3`` on the same rows.

Both write the same 1000-row batches into a fresh file with the same schema and the same pragmas
(WAL, ``synchronous=FULL``, checkpoint and cache sizes), one transaction per batch: the bare side
``executemany`` of the one-row upsert, the repository its multi-row statement through aiosqlite's
thread, binding the ``GeoRow`` tuples. The rows come as the resolver sends them: each flush of
20,000 (``GEO_FLUSH_MAX_DIRTY``) in IP order, cut into messages. The two sides alternate over
a few rounds and each keeps its median round, which damps the fsync noise of a shared disk. The
repository's ``commits`` counter gives commits per ``geo.upsert`` message.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bangui_geo.testing import public_ips
from bench.report import Figure, Target
from services.persistence.ports import GeoRepository
from services.persistence.repository import (
    CACHE_KIB,
    SCHEMA,
    UNRESOLVED_INDEX,
    UPSERT,
    WAL_AUTOCHECKPOINT_PAGES,
    SqliteGeoRepository,
)
from services.resolver.providers.embedded import country_name
from shared.messages import GeoRow, Resolution, iso_utc

BATCH = 1000
FLUSH = 20 * BATCH  # the resolver's GEO_FLUSH_MAX_DIRTY default
_CODES = ("US", "CN", "DE", "FR", "GB", "BR", "IN", "RU", "JP", "NL")


def make_rows(batches: int, salt: int) -> list[list[GeoRow]]:
    """Rows as persistence receives them: ``GeoRow`` tuples, distinct IPs, each flush's worth
    in IP order (the resolver sorts a flush before cutting it into messages)."""
    ips = public_ips(batches * BATCH, salt)
    base = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    rows = [
        GeoRow(
            ip=ip,
            country_code=_CODES[i % len(_CODES)],
            country_name=country_name(_CODES[i % len(_CODES)]),
            resolution=Resolution.RESOLVED,
            provider="embedded",
            cached_at=iso_utc(base + timedelta(microseconds=i)),
        )
        for i, ip in enumerate(ips)
    ]
    for start in range(0, len(rows), FLUSH):
        rows[start : start + FLUSH] = sorted(rows[start : start + FLUSH])
    return [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]


Params = tuple[str | None, ...]


def bare_round(path: Path, batches: list[list[Params]]) -> float:
    """Seconds for plain ``executemany`` + ``commit`` per batch (parameters prepared outside)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")  # same as the project
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        db.execute(SCHEMA)
        db.execute(UNRESOLVED_INDEX)
        db.commit()
        started = time.perf_counter()
        for params in batches:
            db.executemany(UPSERT, params)
            db.commit()
        return time.perf_counter() - started
    finally:
        db.close()


async def project_round(
    repository: GeoRepository, batches: list[list[GeoRow]]
) -> tuple[float, int]:
    """Seconds for ``upsert_many`` per batch, and the repository's commit count, on either store
    (the ``GeoRepository`` port); the repository is closed afterwards."""
    try:
        started = time.perf_counter()
        for rows in batches:
            await repository.upsert_many(rows)
        return time.perf_counter() - started, repository.commits
    finally:
        await repository.close()


async def run_persistence(batches: int, rounds: int, workdir: Path) -> list[Figure]:
    rate = Figure(
        "persistence_upsert",
        f"3. upsert {batches} batches of {BATCH} rows (fresh file, WAL, synchronous=FULL)",
        "rows/s",
        Target("ratio>=", 0.8),
        baseline_is="sqlite3 executemany of the one-row upsert, same rows, one commit per batch",
    )
    commits = Figure(
        "commits_per_upsert",
        "3b. SQLite commits per geo.upsert message (repository.commits / batches)",
        "commits",
        Target("value==", 1),
        baseline_is="one transaction per message",
    )
    rows = make_rows(batches, salt=3)
    params = [
        [tuple(str(v) if isinstance(v, Resolution) else v for v in r) for r in b] for b in rows
    ]
    bare_s: list[float] = []
    project_s: list[float] = []
    counted: list[int] = []
    for n in range(rounds):  # alternate which side goes first: the disk warms up for the second
        for side in ("bare", "project") if n % 2 == 0 else ("project", "bare"):
            if side == "bare":
                path = workdir / f"bare-{n}.sqlite3"
                bare_s.append(await asyncio.to_thread(bare_round, path, params))
            else:
                repository = await SqliteGeoRepository.open(workdir / f"project-{n}.sqlite3")
                seconds, made = await project_round(repository, rows)
                project_s.append(seconds)
                counted.append(made)
    total = batches * BATCH
    rate.project = total / statistics.median(project_s)
    rate.baseline = total / statistics.median(bare_s)
    rate.details.append(
        "rounds (project / bare, s): "
        + ", ".join(f"{p:.2f}/{b:.2f}" for p, b in zip(project_s, bare_s, strict=True))
        + f"; {total:,} rows per round; median round kept"
    )
    rate.metrics.update(
        {f"project_round{n}_s": t for n, t in enumerate(project_s)}
        | {f"baseline_round{n}_s": t for n, t in enumerate(bare_s)}
    )
    commits.project = statistics.mean(counted) / batches
    commits.baseline = 1.0
    commits.details.append(f"repository.commits per round: {counted} for {batches} batches each")
    return [rate, commits]
