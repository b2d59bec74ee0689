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
import runpy
import sys
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from services.cli import database, deadletters, import_sqlite
from services.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from services.cli.inputs import InputError, from_arguments
from services.cli.publish import PublishRequest, publish
from shared.amqp import (
    BrokerError,
    connect_once,
    peek_dead_letters,
    replay_dead_letters,
)
from shared.logging import configure_logging
from shared.settings import Settings, SettingsError, load_settings

PROG = "bangui-geo"
SERVICES = ("resolver", "timer", "persistence")
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
        "--fail2ban-log", type=Path, metavar="FILE", help="publish the IPs of its 'Ban' lines"
    )
    pub.add_argument("--jail", help="jail name sent with the IPs (default: the log's jails)")
    pub.add_argument("--source", help="source sent with the IPs, e.g. fail2ban")
    pub.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")

    look = commands.add_parser("lookup", parents=[db], help="show the geo_cache rows of IPs")
    look.add_argument("ips", nargs="+", metavar="IP")

    stats = commands.add_parser(
        "stats", parents=[db], help="IPs by country, unresolved count, newest row"
    )
    stats.add_argument("--top", type=_positive, metavar="N", help="show the N largest countries")

    imp = commands.add_parser(
        "import-sqlite",
        help="copy a SQLite geo_cache into PostgreSQL (GEO_DB_URL)",
        description="Copy geo_cache from FILE (bangui-geo's or the original BanGUI's) into the "
        "PostgreSQL database of GEO_DB_URL, in batches, with the upsert rules: safe to repeat.",
    )
    imp.add_argument("file", type=Path, metavar="FILE")

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
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_service(str(args.service))
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
            fail2ban_log=args.fail2ban_log,
            jail=args.jail,
            source=args.source,
            quiet=bool(args.quiet),
        )
        if not request.ips and request.fail2ban_log is None and sys.stdin.isatty():
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
        with closing(database.open_reader(settings)) as db:
            print(database.render_lookup(ips, database.lookup(db, ips)))
    elif args.command == "stats":
        with closing(database.open_reader(settings)) as db:
            stats = database.read_stats(db)
        print(database.render_stats(stats, datetime.now(UTC), top=args.top))
    elif args.command == "import-sqlite":
        import_sqlite.run(args.file, settings)
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
    except BrokerError as exc:
        raise CliError(str(exc)) from None
    try:
        if args.dead_command == "list":
            total, letters = await peek_dead_letters(connection, limit=args.limit)
            print(deadletters.render_list(total, letters, body_chars=args.body_chars))
        else:
            outcomes = await replay_dead_letters(
                connection,
                confirm_timeout=settings.publish_timeout,
                limit=args.limit,
                dry_run=bool(args.dry_run),
            )
            print(deadletters.render_replay(outcomes, dry_run=bool(args.dry_run)))
    except BrokerError as exc:
        raise CliError(str(exc)) from None
    finally:
        await connection.close()


def _configure_logging(*, verbose: bool) -> None:
    configure_logging(PROG, fmt="console", level="debug" if verbose else "error")
    if not verbose:  # aiormq logs a failed connect at ERROR; the CLI says it in one line
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    raise SystemExit(main())
