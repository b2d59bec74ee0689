"""``bangui-geo publish``: read and check every IP first, then publish them with the client.

A bad address anywhere refuses the whole input before the broker is even contacted, so a run
publishes everything or nothing of what it was given (a broker failure midway is reported with
the count already confirmed; publishing again is harmless: the pipeline is idempotent).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from services.cli.errors import EXIT_FAILED, EXIT_USAGE, CliError
from services.cli.inputs import (
    InputError,
    SeenIp,
    by_jail,
    from_arguments,
    from_fail2ban_log,
    from_lines,
)
from services.cli.progress import ProgressBar
from shared.client import BrokerUnreachable, GeoPublisher, PublishFailed

PROGRESS_ABOVE = 1000  # IPs; smaller inputs publish in a blink
IPS_PER_CALL = 20_000  # 20 messages of 1000 confirmed together per client call


@dataclass(frozen=True)
class PublishRequest:
    ips: Sequence[str]  # arguments; "-" (or none, without a log file) reads stdin
    fail2ban_logs: Sequence[Path]  # each read in turn; one without a Ban line refuses all
    jail: str | None
    source: str | None
    quiet: bool


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":  # rotated fail2ban logs
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def collect(request: PublishRequest, stdin: TextIO) -> list[SeenIp]:
    """Every address of the request, normalized; ``CliError`` (exit 2) on the first bad one."""
    arguments = [value for value in request.ips if value != "-"]
    read_stdin = "-" in request.ips or (not request.ips and not request.fail2ban_logs)
    try:
        seen = from_arguments(arguments)
        if read_stdin:
            seen += from_lines(stdin, name="stdin")
        for log in request.fail2ban_logs:
            seen += _bans_of(log)
    except InputError as exc:
        raise CliError(f"{exc}; nothing was published", EXIT_USAGE) from None
    return seen


def _bans_of(log: Path) -> list[SeenIp]:
    """The bans of one fail2ban log; a log without a single ``Ban`` line is refused, as it is
    most likely not a fail2ban log at all (or the wrong one)."""
    try:
        with _open_text(log) as log_file:
            bans = from_fail2ban_log(log_file, name=str(log))
    except OSError as exc:
        raise CliError(f"cannot read {log}: {exc.strerror or exc}", EXIT_USAGE) from None
    except EOFError:  # a truncated .gz
        raise CliError(f"cannot read {log}: compressed file ended early", EXIT_USAGE) from None
    if not bans:
        raise CliError(
            f"{log} has no 'Ban' line (is it a fail2ban log?); nothing was published", EXIT_USAGE
        )
    return bans


def _chunks(ips: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(ips), size):
        yield ips[start : start + size]


async def publish(
    request: PublishRequest,
    *,
    amqp_url: str,
    connect_timeout: float,
    confirm_timeout: float,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
) -> None:
    groups = by_jail(collect(request, stdin), request.jail)
    total = sum(len(ips) for ips in groups.values())
    if total == 0:
        if not request.quiet:
            print("nothing to publish", file=err)
        return
    progress = ProgressBar(total, err, enabled=total > PROGRESS_ABOVE and not request.quiet)
    try:
        async with GeoPublisher.connect(
            amqp_url, connect_timeout=connect_timeout, confirm_timeout=confirm_timeout
        ) as geo:
            for jail, ips in groups.items():
                for chunk in _chunks(ips, IPS_PER_CALL):
                    await geo.publish_seen(chunk, jail=jail, source=request.source)
                    progress.advance(len(chunk))
    except BrokerUnreachable as exc:  # a refused login is a bad setting: exit 2
        code = EXIT_USAGE if exc.refused else EXIT_FAILED
        raise CliError(f"{exc}; nothing was published", code) from None
    except PublishFailed as exc:
        progress.finish()
        raise CliError(f"{exc}; {progress.done:,} of {total:,} IPs were confirmed") from None
    progress.finish()
    if not request.quiet:
        jails = ", ".join(sorted(j for j in groups if j is not None))
        print(
            f"published {total:,} IP{'s' if total != 1 else ''} as ip.seen"
            + (f" (jail {jails})" if jails else ""),
            file=out,
        )
