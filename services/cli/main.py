"""Entry point of the ``bangui-geo`` console script: argument parsing and dispatch.

Settings come from the same ``GEO_*`` variables as the services (``--amqp-url`` and ``--db``
override them, e.g. from a fail2ban action). Expected failures (bad IP, broker unreachable,
missing database) print one ``bangui-geo: ...`` line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import runpy
import sys
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from services.agent import command as agent_command
from services.cli import backup, database, deadletters, import_sqlite, prune
from services.cli.durations import format_age, parse_age
from services.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from services.cli.inputs import InputError, from_arguments
from services.cli.live import live_lookup
from services.cli.publish import PublishRequest, publish
from services.cli.table import thousands
from shared.amqp import (
    BrokerConnection,
    BrokerError,
    BrokerUnreachable,
    connect_once,
    peek_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from shared.deadletters import matches
from shared.logging import configure_logging
from shared.messages import MAX_LOOKUP_TIMEOUT_MS
from shared.settings import Settings, SettingsError, load_settings

PROG = "bangui-geo"
SERVICES = ("resolver", "timer", "persistence")
STATS_TOP = 20
LIVE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0  # one attempt: a tool fails fast instead of retrying like a service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Operate the BanGUI geo-IP pipeline (settings: GEO_* variables)."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show library warnings and debug logs"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = argparse.ArgumentParser(add_help=False)
    broker.add_argument(
        "--amqp-url",
        metavar="URL",
        help="broker URL (default: GEO_AMQP_URL); an empty value means the default",
    )
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", type=Path, metavar="FILE", help="SQLite file (default: GEO_DB_PATH)")

    run = commands.add_parser("run", help="run a service (same as python -m services.NAME)")
    run.add_argument("service", choices=SERVICES)

    pub = commands.add_parser(
        "publish",
        parents=[broker],
        help="publish ip.seen for IPs",
        description="Publish ip.seen. Every IP is checked first: one bad IP refuses the whole "
        "input and nothing is published.",
    )
    pub.add_argument(
        "ips", nargs="*", metavar="IP", help="addresses; '-' or none reads stdin, one per line"
    )
    pub.add_argument(
        "--fail2ban-log",
        type=Path,
        action="append",
        metavar="FILE",
        help="publish the IPs of its 'Ban' lines (repeat for several logs, e.g. rotated ones)",
    )
    pub.add_argument("--jail", help="jail name sent with the IPs (default: the log's jails)")
    pub.add_argument("--source", help="source sent with the IPs, e.g. fail2ban")
    pub.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")

    agent = commands.add_parser(
        "agent",
        parents=[broker],
        help="follow fail2ban's database and publish its bans as ip.seen",
        description="Follow fail2ban's own SQLite database (read-only) and publish every ban "
        "as ip.seen (source fail2ban), saving the position once the broker confirmed.",
    )
    agent_command.add_arguments(agent)

    look = commands.add_parser(
        "lookup",
        parents=[db, broker],
        help="show the geo_cache rows of IPs (--live: ask the resolver)",
        description="Show the geo_cache rows of IPs from the file, or with --live ask the "
        "resolver over the broker (geo.lookup): unknown IPs are resolved and stored.",
    )
    look.add_argument("ips", nargs="+", metavar="IP")
    look.add_argument("--live", action="store_true", help="ask the resolver over the broker")
    look.add_argument(
        "--timeout",
        type=float,
        default=LIVE_TIMEOUT,
        metavar="SECONDS",
        help=f"with --live: how long to wait (default {LIVE_TIMEOUT:g}; at most 30)",
    )

    stats = commands.add_parser(
        "stats", parents=[db], help="IPs by country, unresolved count, newest row"
    )
    shown = stats.add_mutually_exclusive_group()
    shown.add_argument(
        "--top",
        type=_positive,
        default=STATS_TOP,
        metavar="N",
        help=f"show the N largest countries (default {STATS_TOP}), the rest as one line",
    )
    shown.add_argument("--all", action="store_true", help="show every country")

    copy = commands.add_parser(
        "backup",
        parents=[db],
        help="copy geo_cache to FILE, consistent while persistence writes",
        description="An online backup (one SQLite snapshot, checked with integrity_check) into "
        "FILE, written beside it first and renamed into place. Restore: stop persistence, "
        "replace GEO_DB_PATH with the copy (removing its -wal and -shm files), start it again.",
    )
    copy.add_argument("file", type=Path, metavar="FILE", help="where the copy goes")
    copy.add_argument("--force", action="store_true", help="replace FILE if it exists")

    imp = commands.add_parser(
        "import-sqlite",
        help="copy a SQLite geo_cache into PostgreSQL (GEO_DB_URL)",
        description="Copy geo_cache from FILE (bangui-geo's or the original BanGUI's) into the "
        "PostgreSQL database of GEO_DB_URL, in batches, with the upsert rules: safe to repeat.",
    )
    imp.add_argument("file", type=Path, metavar="FILE")

    trim = commands.add_parser(
        "prune",
        parents=[db],
        help="delete geo_cache rows not seen for a while (asks first unless --yes)",
        description="Delete the geo_cache rows whose IP no ip.seen mentioned for longer than "
        "AGE (last_seen, or cached_at where last_seen is NULL), in short chunks, safe while "
        "persistence runs; SQLite (GEO_DB_PATH, --db) or PostgreSQL (GEO_DB_URL). It counts "
        "them first and asks; --yes skips the question.",
    )
    trim.add_argument(
        "--older-than",
        type=_prune_age,
        required=True,
        metavar="AGE",
        help="not seen for longer than AGE (at least 1d), e.g. 90d, 26w",
    )
    trim.add_argument("-y", "--yes", action="store_true", help="do not ask")

    dead = commands.add_parser("dead-letters", help="inspect or replay geo.dead_letter")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser(
        "list", parents=[broker], help="show dead letters (they stay in the queue)"
    )
    dead_list.add_argument("--limit", type=_positive, default=50, metavar="N")
    dead_list.add_argument("--body-chars", type=_positive, default=200, metavar="N")
    replay = dead_commands.add_parser(
        "replay",
        parents=[broker],
        help="republish dead letters to bangui with their original routing keys",
    )
    replay.add_argument("--limit", type=_positive, default=10_000, metavar="N")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    purge = dead_commands.add_parser(
        "purge",
        parents=[broker],
        help="remove dead letters for good (asks first unless --yes)",
        description="Remove the dead letters that match every criterion given (none: all of "
        "them). It counts them first and asks; --yes skips the question.",
    )
    purge.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="only those dead-lettered longer ago than AGE, e.g. 12h, 7d (unknown age: kept)",
    )
    purge.add_argument(
        "--reason",
        type=_pattern,
        metavar="PATTERN",
        help="only those whose reason matches this regular expression (case-insensitive)",
    )
    purge.add_argument("--limit", type=_positive, default=1_000_000, metavar="N")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return parser


def _age(text: str) -> timedelta:
    age = parse_age(text)
    if age is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 30m, 12h or 7d")
    return age


def _prune_age(text: str) -> timedelta:
    age = _age(text)
    if age < prune.MIN_AGE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is under a day: last_seen is written once a day, so a shorter age would"
            " delete rows of IPs seen today"
        )
    return age


def _pattern(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {exc}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_service(str(args.service))
    if args.command == "agent":  # long-running: logs like a service, not like a tool
        return agent_command.main(args, PROG)
    _configure_logging(verbose=bool(args.verbose))
    try:
        return _dispatch(args)
    except CliError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `bangui-geo stats | head -3`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    settings = _settings(amqp_url=getattr(args, "amqp_url", None), db=getattr(args, "db", None))
    if args.command == "publish":
        request = PublishRequest(
            ips=list(args.ips),
            fail2ban_logs=tuple(args.fail2ban_log or ()),
            jail=args.jail,
            source=args.source,
            quiet=bool(args.quiet),
        )
        if not request.ips and not request.fail2ban_logs and sys.stdin.isatty():
            raise CliError(
                "no IPs given: pass them as arguments, pipe them on stdin or use --fail2ban-log",
                EXIT_USAGE,
            )
        coroutine = publish(
            request,
            amqp_url=settings.amqp_url,
            connect_timeout=CONNECT_TIMEOUT,
            confirm_timeout=settings.publish_timeout,
            stdin=sys.stdin,
            out=sys.stdout,
            err=sys.stderr,
        )
        asyncio.run(coroutine)
    elif args.command == "lookup":
        try:
            ips = [entry.ip for entry in from_arguments(list(args.ips))]
        except InputError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if args.live:
            if not 0 < args.timeout <= MAX_LOOKUP_TIMEOUT_MS / 1000:
                raise CliError("--timeout: between 0 and 30 seconds", EXIT_USAGE)
            found = asyncio.run(
                live_lookup(
                    ips,
                    amqp_url=settings.amqp_url,
                    connect_timeout=CONNECT_TIMEOUT,
                    deadline=float(args.timeout),
                )
            )
            print(database.render_lookup(ips, found))
        else:
            with closing(database.open_reader(settings)) as db:
                print(database.render_lookup(ips, database.lookup(db, ips)))
    elif args.command == "stats":
        with closing(database.open_reader(settings)) as db:
            stats = database.read_stats(db)
        top = None if args.all else int(args.top)
        print(database.render_stats(stats, datetime.now(UTC), top=top))
    elif args.command == "backup":
        if settings.db_url is not None:
            raise CliError(
                "geo_cache is in PostgreSQL (GEO_DB_URL): back it up with pg_dump; "
                "backup copies a SQLite file (--db FILE)",
                EXIT_USAGE,
            )
        result = backup.backup(settings.db_path, args.file, overwrite=bool(args.force))
        print(
            f"backed up {thousands(result.rows)} rows of {settings.db_path} to {result.target}"
            f" ({thousands(result.size_bytes)} bytes, integrity ok)"
        )
    elif args.command == "import-sqlite":
        import_sqlite.run(args.file, settings)
    elif args.command == "prune":
        prune.run(settings, args.older_than, yes=bool(args.yes))
    elif args.command == "dead-letters":
        asyncio.run(_dead_letters(args, settings))
    return EXIT_OK


def run_service(name: str) -> int:
    """``bangui-geo run NAME``: runs ``services.NAME`` as ``python -m services.NAME`` does, so the
    start wiring (body, start checks) lives in one place, the service's ``__main__``."""
    try:
        runpy.run_module(f"services.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return EXIT_OK


def _settings(*, amqp_url: str | None, db: Path | None) -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(f"invalid setting {exc}", EXIT_USAGE) from None
    updates: dict[str, object] = {}
    if amqp_url:  # empty: not given (a fail2ban action passes its option through as is)
        updates["amqp_url"] = amqp_url
    if db is not None:
        updates["db_path"] = db
        updates["db_url"] = None  # an explicit SQLite file wins over GEO_DB_URL
    if not updates:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), **updates})
    except ValidationError as exc:
        error = exc.errors()[0]
        option = "--amqp-url" if error["loc"] == ("amqp_url",) else "--db"
        message = error["msg"].removeprefix("Value error, ")
        raise CliError(f"{option}: {message}", EXIT_USAGE) from None


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> None:
    try:
        connection = await connect_once(settings.amqp_url, connect_timeout=CONNECT_TIMEOUT)
    except BrokerUnreachable as exc:  # a refused login is a bad setting: exit 2
        raise CliError(str(exc), EXIT_USAGE if exc.refused else EXIT_FAILED) from None
    try:
        if args.dead_command == "list":
            total, letters = await peek_dead_letters(connection, limit=args.limit)
            print(deadletters.render_list(total, letters, body_chars=args.body_chars))
        elif args.dead_command == "replay":
            total, outcomes = await replay_dead_letters(
                connection,
                confirm_timeout=settings.publish_timeout,
                limit=args.limit,
                dry_run=bool(args.dry_run),
            )
            print(deadletters.render_replay(total, outcomes, dry_run=bool(args.dry_run)))
        else:
            await _purge(args, connection)
    except BrokerError as exc:
        raise CliError(str(exc)) from None
    finally:
        await connection.close()


async def _purge(args: argparse.Namespace, connection: BrokerConnection) -> None:
    now = datetime.now(UTC)
    select = partial(matches, now=now, older_than=args.older_than, reason=args.reason)
    criteria = (
        ", ".join(
            part
            for part in (
                f"older than {format_age(args.older_than)}" if args.older_than is not None else "",
                f"reason matching {args.reason.pattern!r}" if args.reason is not None else "",
            )
            if part
        )
        or "all of them"
    )
    if not args.yes:
        total, letters = await peek_dead_letters(connection, limit=args.limit)
        selected = sum(select(letter) for letter in letters)
        if selected == 0:
            print(f"no dead letter matches ({criteria}); {total:,} in geo.dead_letter")
            return
        if not sys.stdin.isatty():
            raise CliError(
                f"{deadletters.purge_question(selected, total, criteria)} pass --yes to confirm "
                "(stdin is not a terminal); nothing was purged",
                EXIT_USAGE,
            )
        question = deadletters.purge_question(selected, total, criteria) + " [y/N] "
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing was purged")
            return
    report = await purge_dead_letters(connection, select=select, limit=args.limit)
    print(deadletters.render_purge(report))


def _configure_logging(*, verbose: bool) -> None:
    configure_logging(PROG, fmt="console", level="debug" if verbose else "error")
    if not verbose:  # aiormq logs a failed connect at ERROR; the CLI says it in one line
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    raise SystemExit(main())
