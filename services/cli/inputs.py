"""Where ``bangui-geo publish`` gets its IPs: arguments, lines on stdin, a fail2ban log.

Pure parsing, no I/O beyond the lines handed in: every address is normalized here, and every bad
one is reported with where it came from (argument, line number), so a whole input can be refused
before anything is published.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.ipnorm import normalize_ip

# "2024-05-01 12:00:00,123 fail2ban.actions [812]: NOTICE  [sshd] Ban 192.0.2.1", also the
# syslog/journal forms and "Restore Ban" (a ban restored at restart); never "Unban".
FAIL2BAN_BAN = re.compile(r"\bNOTICE\s+\[(?P<jail>[^\]]+)\]\s+(?:Restore\s+)?Ban\s+(?P<ip>\S+)\s*$")


@dataclass(frozen=True)
class SeenIp:
    ip: str  # normalized
    where: str  # e.g. "argument 2", "stdin line 7"
    jail: str | None = None  # the jail a fail2ban log line names


class InputError(ValueError):
    """Some entries are not IP addresses; ``problems`` names each one and where it was."""

    def __init__(self, problems: Sequence[str]) -> None:
        others = len(problems) - 1
        more = f" (and {others} more bad {'entry' if others == 1 else 'entries'})" if others else ""
        super().__init__(f"{problems[0]}{more}")
        self.problems = list(problems)


def _check(entries: Iterable[tuple[str, str, str | None]]) -> list[SeenIp]:
    seen: list[SeenIp] = []
    problems: list[str] = []
    for value, where, jail in entries:
        try:
            seen.append(SeenIp(normalize_ip(value), where, jail))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise InputError(problems)
    return seen


def from_arguments(values: Sequence[str]) -> list[SeenIp]:
    return _check((value, f"argument {n}", None) for n, value in enumerate(values, 1))


def from_lines(lines: Iterable[str], *, name: str) -> list[SeenIp]:
    """One address per line; blank lines and ``#`` comments are skipped."""
    return _check(
        (line.strip(), f"{name} line {n}", None)
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )


def from_fail2ban_log(lines: Iterable[str], *, name: str) -> list[SeenIp]:
    """The addresses of the ``Ban`` lines of a fail2ban log, with their jails; other lines
    (Found, Unban, already banned, ...) are ignored."""
    entries = []
    for n, line in enumerate(lines, 1):
        match = FAIL2BAN_BAN.search(line.rstrip("\r\n"))
        if match is not None:
            entries.append((match["ip"], f"{name} line {n}", match["jail"]))
    return _check(entries)


def by_jail(seen: Iterable[SeenIp], jail: str | None) -> dict[str | None, list[str]]:
    """Distinct addresses per jail, in first-seen order; ``jail`` (from ``--jail``) overrides
    the jails the log lines name."""
    groups: dict[str | None, dict[str, None]] = {}
    for entry in seen:
        groups.setdefault(jail if jail is not None else entry.jail, {})[entry.ip] = None
    return {key: list(ips) for key, ips in groups.items()}
