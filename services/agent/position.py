"""Where the agent is in fail2ban's ``bans`` table, and the pure rules for moving on from it.

``bans`` has no primary key of its own, so its implicit rowid grows with each insert, except that
SQLite hands out ``max(rowid) + 1``: once the newest rows are deleted (an unban, a purge of a
quiet database), rowids are reused. The position therefore keeps the last row published (its
rowid and its contents, the *anchor*) and the file's identity; an anchor that is gone or changed
means "look again from its time", and a new file means "start over". Duplicates are allowed,
gaps are not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from shared.ipnorm import normalize_ip
from shared.messages import MAX_IPS_PER_MESSAGE

STATE_FORMAT = 1


class BanRow(NamedTuple):
    """One row of fail2ban's ``bans`` table, as read (a tuple: a backfill makes 100,000s)."""

    rowid: int
    jail: str
    ip: str
    timeofban: int


@dataclass(frozen=True)
class FileIdentity:
    """What tells one database file from another at the same path."""

    device: int
    inode: int


@dataclass(frozen=True)
class Position:
    """The last ban the broker confirmed, in the file it came from; ``anchor`` None: none yet."""

    identity: FileIdentity | None
    anchor: BanRow | None

    @property
    def after_rowid(self) -> int:
        return self.anchor.rowid if self.anchor is not None else 0


START = Position(identity=None, anchor=None)


@dataclass(frozen=True)
class Continue:
    """The anchor is where we left it: read the rows after it."""

    after_rowid: int


@dataclass(frozen=True)
class Rewind:
    """The anchor is gone or another row took its rowid: re-read from the first row that is
    either past it or at least as recent as it (``Rewind.since``); duplicates follow, no gap."""

    after_rowid: int
    since: int


ReadPlan = Continue | Rewind


def plan_read(anchor: BanRow | None, found: BanRow | None) -> ReadPlan:
    """``found`` is the row at ``anchor.rowid`` now (None when there is none)."""
    if anchor is None:
        return Continue(0)
    if found == anchor:
        return Continue(anchor.rowid)
    return Rewind(after_rowid=anchor.rowid, since=anchor.timeofban)


def on_file(position: Position, identity: FileIdentity) -> Position:
    """The position to read ``identity`` from: kept for the same file, the start for another."""
    if position.identity == identity:
        return position
    return Position(identity=identity, anchor=None)


@dataclass(frozen=True)
class Outgoing:
    """One ``ip.seen`` message: one jail, up to 1000 distinct addresses, and ``seen_at`` the
    newest ``timeofban`` among them (every address in it was banned by then)."""

    jail: str
    seen_at: int
    ips: tuple[str, ...]


@dataclass(frozen=True)
class Batch:
    messages: tuple[Outgoing, ...]
    skipped: tuple[BanRow, ...]  # rows whose ip is not an address (fail2ban can ban other ids)

    @property
    def ip_count(self) -> int:
        return sum(len(m.ips) for m in self.messages)


def group(rows: Iterable[BanRow]) -> Batch:
    """The messages for ``rows``: grouped by jail in order of first appearance, each jail's
    addresses normalized, de-duplicated and cut into messages of at most 1000.

    Grouping by jail rather than by (jail, timeofban) keeps a backfill of bans a second apart
    at 1000 addresses a message; the price is that ``seen_at`` is the message's newest ban."""
    by_jail: dict[str, dict[str, int]] = {}
    skipped: list[BanRow] = []
    for row in rows:
        try:
            ip = normalize_ip(row.ip)
        except ValueError:
            skipped.append(row)
            continue
        seen = by_jail.get(row.jail)
        if seen is None:
            seen = by_jail[row.jail] = {}
        before = seen.get(ip)
        if before is None or row.timeofban > before:
            seen[ip] = row.timeofban
    messages: list[Outgoing] = []
    for jail, times in by_jail.items():
        ips = list(times)
        for start in range(0, len(ips), MAX_IPS_PER_MESSAGE):
            chunk = tuple(ips[start : start + MAX_IPS_PER_MESSAGE])
            messages.append(Outgoing(jail, max(times[ip] for ip in chunk), chunk))
    return Batch(tuple(messages), tuple(skipped))


def advance(position: Position, rows: Sequence[BanRow]) -> Position:
    """The position once ``rows`` (read in rowid order) are confirmed."""
    if not rows:
        return position
    return Position(identity=position.identity, anchor=rows[-1])


def lag_seconds(anchor: BanRow | None, newest: BanRow | None, pending: BanRow | None) -> float:
    """Seconds between fail2ban's newest ban and the last one confirmed (0 when caught up);
    before the first confirm, measured from ``pending``, the oldest ban read but unconfirmed."""
    if newest is None or (anchor is not None and newest.rowid <= anchor.rowid):
        return 0.0
    reference = anchor if anchor is not None else pending
    if reference is None:
        return 0.0
    return float(max(0, newest.timeofban - reference.timeofban))


class StateCorrupt(ValueError):
    """The state file cannot be understood; the agent says so and starts over."""


def dump_state(position: Position, database: str) -> str:
    anchor = position.anchor
    identity = position.identity
    return json.dumps(
        {
            "format": STATE_FORMAT,
            "database": database,
            "device": identity.device if identity else None,
            "inode": identity.inode if identity else None,
            "anchor": None
            if anchor is None
            else {
                "rowid": anchor.rowid,
                "jail": anchor.jail,
                "ip": anchor.ip,
                "timeofban": anchor.timeofban,
            },
        },
        indent=1,
    )


def load_state(text: str, database: str) -> Position:
    """The position a state file holds; a state of another database path is the start."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateCorrupt(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise StateCorrupt(f"not a format-{STATE_FORMAT} agent state")
    if data.get("database") != database:
        return START
    try:
        device, inode, anchor = data["device"], data["inode"], data["anchor"]
        identity = None if device is None else FileIdentity(_int(device), _int(inode))
        row = (
            None
            if anchor is None
            else BanRow(
                _int(anchor["rowid"]),
                _str(anchor["jail"]),
                _str(anchor["ip"]),
                _int(anchor["timeofban"]),
            )
        )
    except (KeyError, TypeError) as exc:
        raise StateCorrupt(f"bad field ({exc!r})") from None
    return Position(identity=identity, anchor=row)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
