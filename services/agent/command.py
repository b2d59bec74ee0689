"""``bangui-geo agent``: its flags, the start checks that end in one ``bangui-geo: ...`` line
(exit 2), and the run under the services' lifecycle (signals, bounded shutdown, logs)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog
from pydantic import ValidationError

from services.agent.link import LinkSettings
from services.agent.position import START, Position, StateCorrupt
from services.agent.runner import AgentOptions, run_agent
from services.agent.source import DatabaseError, DatabaseMissing, check_database
from services.agent.statefile import StateUnusable, check_writable, read_state
from services.cli.durations import parse_age
from shared.lifecycle import run_service
from shared.logging import configure_logging
from shared.settings import Settings, SettingsError, load_settings

DEFAULT_DATABASE = Path("/var/lib/fail2ban/fail2ban.sqlite3")  # fail2ban's default dbfile
DEFAULT_STATE = Path("/var/lib/bangui-geo/agent-state.json")
CONNECT_TIMEOUT = 5.0
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fail2ban-db",
        type=Path,
        default=DEFAULT_DATABASE,
        metavar="FILE",
        help=f"fail2ban's database, its dbfile (default: {DEFAULT_DATABASE})",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        metavar="FILE",
        help=f"where the agent keeps its position (default: {DEFAULT_STATE})",
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="publish only bans from then on: an ISO date/time (UTC unless it says) or an age "
        "such as 30m, 12h, 7d (default: every ban in the database)",
    )
    parser.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=0.5,
        metavar="S",
        help="seconds between looks at the database once caught up (default: 0.5)",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="bans read, published and confirmed per step (default: 10000)",
    )
    parser.add_argument(
        "--retry-max",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="longest wait between attempts at an unreachable broker (default: 30)",
    )


def parse_since(text: str, now: datetime) -> int:
    """Epoch seconds for ``--since``: an age before ``now`` or an ISO 8601 date/time."""
    age = parse_age(text)
    if age is not None:
        return int((now - age).timestamp())
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since: {text!r} is neither an ISO date/time nor an age like 12h or 7d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(args: argparse.Namespace, prog: str) -> int:
    """Check the inputs, then follow the database until SIGTERM/SIGINT; the exit code."""
    try:
        settings = _settings(args.amqp_url)
        since = None if args.since is None else parse_since(args.since, datetime.now(UTC))
        database: Path = args.fail2ban_db
        state: Path = args.state
        check_writable(state)
        with contextlib.suppress(DatabaseMissing):  # fail2ban creates it: the agent waits
            check_database(database)
        configure_logging("agent", fmt=settings.log_format, level=settings.log_level)
        position = _position(state, database)
    except (ValueError, DatabaseError, StateUnusable) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = AgentOptions(
        database=database,
        state=state,
        since=since,
        poll_interval=float(args.poll_interval),
        batch_size=int(args.batch),
        link=LinkSettings(
            url=settings.amqp_url,
            connect_timeout=CONNECT_TIMEOUT,
            confirm_timeout=settings.publish_timeout,
            retry_base=0.5,
            retry_max=float(args.retry_max),
        ),
    )
    try:
        return asyncio.run(run_service("agent", settings, partial(run_agent, options, position)))
    except KeyboardInterrupt:
        return 130


def _position(state: Path, database: Path) -> Position:
    try:
        return read_state(state, database)
    except StateCorrupt as exc:
        structlog.get_logger("agent").warning(
            "agent_state_corrupt",
            state=str(state),
            reason=str(exc),
            message=f"state file {state} is corrupt ({exc}): starting over from the first ban",
        )
        return START


def _settings(amqp_url: str | None) -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise ValueError(f"invalid setting {exc}") from None
    if not amqp_url:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), "amqp_url": amqp_url})
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"--amqp-url: {message}") from None
