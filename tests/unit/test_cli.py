"""The ``bangui-geo`` CLI without a broker: parsing, input checks, the read-only database views,
and the one-line errors for a bad IP, a missing database and an unreachable broker."""

from __future__ import annotations

import gzip
import io
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.cli import main as cli
from services.cli.database import Stats, age, render_stats
from services.cli.deadletters import excerpt, render_letter
from services.cli.durations import format_age, parse_age
from services.cli.inputs import InputError, by_jail, from_fail2ban_log, from_lines
from services.cli.progress import ProgressBar
from services.cli.publish import PublishRequest, collect
from services.persistence.repository import SqliteGeoRepository
from shared.amqp import dead_letter_from
from shared.messages import GeoRow, Resolution, iso_utc

REPO_ROOT = Path(__file__).resolve().parents[2]

# Lines as fail2ban 1.0 writes them to /var/log/fail2ban.log (and the syslog/journal forms its
# own recidive filter's test log uses).
F2B = "2026-11-22 12:0{}:00,101 fail2ban.{:<15}[812]: {:<7} [{}] {}\n"
FAIL2BAN_LOG = "".join(
    [
        F2B.format(0, "filter", "INFO", "sshd", "Found 203.0.113.7 - 2026-11-22 12:00:00"),
        F2B.format(0, "actions", "NOTICE", "sshd", "Ban 203.0.113.7"),
        F2B.format(1, "actions", "NOTICE", "sshd", "203.0.113.7 already banned"),
        F2B.format(1, "actions", "NOTICE", "postfix-sasl", "Ban 2001:db8::a"),
        F2B.format(5, "actions", "NOTICE", "sshd", "Unban 203.0.113.7"),
        F2B.format(6, "actions", "NOTICE", "sshd", "Restore Ban ::ffff:198.51.100.9"),
        "Mar 05 08:41:28 test.org fail2ban-server[11524]: fail2ban.actions        [11524]: "
        "NOTICE  [sshd] Ban 192.0.2.2\n",
        F2B.format(7, "actions", "NOTICE", "sshd", "Ban 203.0.113.7"),
    ]
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GEO_* from the outer environment; the CLI's global logging setup kept out of other
    tests (structlog caches loggers, which would break their capture_logs)."""
    for name in list(os.environ):
        if name.startswith("GEO_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)
    levels = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika")}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    original = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdin = original
    out, err = capsys.readouterr()
    return code, out, err


# --- parsing -----------------------------------------------------------------------------------


def test_publish_arguments_parse_into_the_request_fields() -> None:
    args = cli.build_parser().parse_args(
        ["publish", "--jail", "sshd", "--source", "fail2ban", "--amqp-url", "", "-q", "1.2.3.4"]
    )
    assert (args.command, args.ips, args.jail, args.source) == (
        "publish",
        ["1.2.3.4"],
        "sshd",
        "fail2ban",
    )
    assert args.amqp_url == ""
    assert args.quiet is True
    assert args.fail2ban_log is None


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "scheduler"],
        ["dead-letters"],
        ["dead-letters", "list", "--limit", "0"],
        ["lookup"],
        [],
    ],
)
def test_bad_command_lines_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_dead_letter_defaults() -> None:
    args = cli.build_parser().parse_args(["dead-letters", "replay", "--dry-run"])
    assert (args.dead_command, args.dry_run, args.limit) == ("replay", True, 10_000)
    args = cli.build_parser().parse_args(["dead-letters", "list"])
    assert (args.dead_command, args.limit, args.body_chars) == ("list", 50, 200)


def test_run_is_the_service_entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_FLUSH_INTERVAL", "-1")
    code, _, err = run_cli(capsys, "run", "timer")
    assert code == 2
    assert err.startswith("timer: invalid setting GEO_FLUSH_INTERVAL")


# --- inputs ------------------------------------------------------------------------------------


def test_fail2ban_log_gives_the_banned_ips_with_their_jails_and_lines() -> None:
    seen = from_fail2ban_log(FAIL2BAN_LOG.splitlines(keepends=True), name="f2b.log")
    assert [(s.ip, s.jail, s.where) for s in seen] == [
        ("203.0.113.7", "sshd", "f2b.log line 2"),
        ("2001:db8::a", "postfix-sasl", "f2b.log line 4"),
        ("198.51.100.9", "sshd", "f2b.log line 6"),
        ("192.0.2.2", "sshd", "f2b.log line 7"),
        ("203.0.113.7", "sshd", "f2b.log line 8"),
    ]
    assert by_jail(seen, None) == {
        "sshd": ["203.0.113.7", "198.51.100.9", "192.0.2.2"],
        "postfix-sasl": ["2001:db8::a"],
    }
    assert by_jail(seen, "imported") == {
        "imported": ["203.0.113.7", "2001:db8::a", "198.51.100.9", "192.0.2.2"]
    }


def test_stdin_lines_skip_blanks_and_comments_and_are_normalized() -> None:
    seen = from_lines(["# banned today\n", "\n", " 2001:DB8:0::1 \n", "::ffff:1.2.3.4\n"], name="x")
    assert [(s.ip, s.where) for s in seen] == [("2001:db8::1", "x line 3"), ("1.2.3.4", "x line 4")]


def test_every_bad_line_is_found_and_the_first_is_named() -> None:
    with pytest.raises(InputError) as error:
        from_lines(["1.1.1.1", "nope", "2.2.2.2", "fe80::1%eth0", "300.1.1.1"], name="stdin")
    assert len(error.value.problems) == 3
    assert str(error.value) == (
        "stdin line 2: not an IPv4 or IPv6 address: 'nope' (and 2 more bad entries)"
    )


# --- publish: checked before the broker is contacted -----------------------------------------


def test_bad_argument_refuses_everything_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    code, out, err = run_cli(capsys, "publish", "1.2.3.4", "nope")
    assert code == 2
    assert out == ""
    assert err == (
        "bangui-geo: argument 2: not an IPv4 or IPv6 address: 'nope'; nothing was published\n"
    )


def test_bad_stdin_line_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    code, _, err = run_cli(capsys, "publish", stdin="1.1.1.1\n\n8.8.8.8 9.9.9.9\n")
    assert code == 2
    assert err == (
        "bangui-geo: stdin line 3: not an IPv4 or IPv6 address: '8.8.8.8 9.9.9.9'; "
        "nothing was published\n"
    )


def test_bad_ban_line_in_a_fail2ban_log_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "fail2ban.log"
    log.write_text(
        FAIL2BAN_LOG + "2026-11-22 12:08:00,000 fail2ban.actions [812]: NOTICE  [x] Ban 1.2.3\n"
    )
    code, _, err = run_cli(capsys, "publish", "--fail2ban-log", str(log))
    assert code == 2
    assert f"{log} line 9: not an IPv4 or IPv6 address: '1.2.3'" in err
    assert err.count("\n") == 1


def test_several_fail2ban_logs_are_all_read(tmp_path: Path) -> None:
    current, rotated = tmp_path / "fail2ban.log", tmp_path / "fail2ban.log.1.gz"
    current.write_text(FAIL2BAN_LOG)
    with gzip.open(rotated, "wt") as old:
        old.write(F2B.format(0, "actions", "NOTICE", "nginx", "Ban 198.51.100.77"))
    args = cli.build_parser().parse_args(
        ["publish", "--fail2ban-log", str(current), "--fail2ban-log", str(rotated)]
    )
    request = PublishRequest([], tuple(args.fail2ban_log), None, None, quiet=True)
    groups = by_jail(collect(request, io.StringIO("")), None)
    assert groups == {
        "sshd": ["203.0.113.7", "198.51.100.9", "192.0.2.2"],
        "postfix-sasl": ["2001:db8::a"],
        "nginx": ["198.51.100.77"],
    }


def test_a_log_without_a_ban_line_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, quiet = tmp_path / "fail2ban.log", tmp_path / "auth.log"
    good.write_text(FAIL2BAN_LOG)
    quiet.write_text(F2B.format(5, "actions", "NOTICE", "sshd", "Unban 203.0.113.7"))
    port = closed_port()  # never reached: the input is refused first
    code, out, err = run_cli(
        capsys,
        *("publish", "--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/"),
        *("--fail2ban-log", str(good), "--fail2ban-log", str(quiet)),
    )
    assert (code, out) == (2, "")
    assert err == (
        f"bangui-geo: {quiet} has no 'Ban' line (is it a fail2ban log?); nothing was published\n"
    )


def test_missing_fail2ban_log_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "publish", "--fail2ban-log", str(tmp_path / "none.log"))
    assert code == 2
    assert err == f"bangui-geo: cannot read {tmp_path / 'none.log'}: No such file or directory\n"


def test_empty_input_publishes_nothing_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "publish", "-", stdin="# nothing\n\n")
    assert (code, out, err) == (0, "", "nothing to publish\n")


def test_unreachable_broker_fails_fast_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port()
    monkeypatch.setenv("GEO_AMQP_URL", f"amqp://bangui:s3cret@127.0.0.1:{port}/")
    started = time.monotonic()
    code, out, err = run_cli(capsys, "publish", "203.0.113.7")
    assert time.monotonic() - started < 4
    assert code == 1
    assert out == ""
    assert err.startswith(
        f"bangui-geo: cannot connect to the broker at amqp://bangui:***@127.0.0.1:{port}/"
    )
    assert err.endswith("; nothing was published\n")
    assert err.count("\n") == 1
    assert "s3cret" not in err

    code, _, err = run_cli(capsys, "dead-letters", "list")
    assert code == 1
    assert err.startswith("bangui-geo: cannot connect to the broker")
    assert err.count("\n") == 1


def test_amqp_url_option_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_AMQP_URL", "amqp://guest:guest@broker.invalid:5672/")
    port = closed_port()
    code, _, err = run_cli(
        capsys, "publish", "--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/", "1.2.3.4"
    )
    assert code == 1
    assert f"127.0.0.1:{port}" in err

    # An empty value (the fail2ban action's default option) means "not given": the environment.
    monkeypatch.setenv("GEO_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{port}/from-env")
    code, _, err = run_cli(capsys, "publish", "--amqp-url", "", "1.2.3.4")
    assert code == 1
    assert f"127.0.0.1:{port}/from-env" in err

    code, _, err = run_cli(capsys, "publish", "--amqp-url", "http://x/", "1.2.3.4")
    assert (code, err) == (2, "bangui-geo: --amqp-url: must start with amqp:// or amqps://\n")


def test_console_script_entry_prints_no_traceback(tmp_path: Path) -> None:
    """The real process: no traceback, no library log lines, just the one error line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    env["GEO_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "publish", "198.51.100.1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("bangui-geo: cannot connect to the broker")
    assert "Traceback" not in done.stderr


# --- lookup and stats on a real SQLite file ----------------------------------------------------

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


def row(
    ip: str, code: str | None, name: str | None, resolution: Resolution, ago_s: float
) -> GeoRow:
    return GeoRow(
        ip=ip,
        country_code=code,
        country_name=name,
        resolution=resolution,
        provider="embedded" if code else None,
        cached_at=iso_utc(NOW - timedelta(seconds=ago_s)),
    )


ROWS = [
    row("203.0.113.7", "US", "United States", Resolution.RESOLVED, 3600),
    row("198.51.100.1", "US", "United States", Resolution.RESOLVED, 900),
    row("2001:db8::1", "DE", "Germany", Resolution.RESOLVED, 600),
    row("192.0.2.55", "US", "United States", Resolution.RESOLVED, 7200),
    row("10.0.0.1", None, None, Resolution.NOT_GLOBAL, 300),
    row("203.0.113.99", None, None, Resolution.FAILED, 120),
]


@pytest.fixture
async def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "geo_cache.sqlite3"
    repository = await SqliteGeoRepository.open(path)
    try:
        await repository.upsert_many(ROWS)
    finally:
        await repository.close()
    return path


def test_lookup_prints_rows_and_names_the_unknown(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = db_path.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "lookup", "--db", str(db_path), "::ffff:203.0.113.7", "8.8.8.8")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ip", "country", "name", "asn", "org", "resolution", "provider", "cached_at"
    ]  # fmt: skip
    assert lines[2].split() == [
        "203.0.113.7", "US", "United", "States", "-", "-", "resolved", "embedded",
        "2026-11-22T11:00:00.000000Z",
    ]  # fmt: skip
    assert lines[3].split(maxsplit=1) == ["8.8.8.8", "not in geo_cache"]
    assert db_path.stat().st_mtime_ns == before


def test_lookup_rejects_a_bad_ip(db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "lookup", "--db", str(db_path), "1.2.3.4", "x.y")
    assert (code, out) == (2, "")
    assert err == "bangui-geo: argument 2: not an IPv4 or IPv6 address: 'x.y'\n"


def test_stats_counts_by_country_and_unresolved(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_DB_PATH", str(db_path))
    code, out, _ = run_cli(capsys, "stats")
    assert code == 0
    lines = out.splitlines()
    assert [line.split() for line in lines[2:6]] == [
        ["US", "United", "States", "3", "50.0%"],
        ["DE", "Germany", "1", "16.7%"],
        ["--", "unresolved", "2", "33.3%"],
        ["total", "6", "100.0%"],
    ]
    assert lines[6] == "unresolved: 2 (failed 1, not_global 1)"
    assert lines[7].startswith("newest row: 2026-11-22T11:58:00.000000Z (")


def test_stats_render_with_top_and_age() -> None:
    stats = Stats(
        by_country=[("US", "United States", 900), ("DE", "Germany", 80), ("FR", "France", 20)],
        unresolved={},
        newest="2026-11-22T11:55:00.000000Z",
    )
    text = render_stats(stats, NOW, top=1)
    assert [line.split() for line in text.splitlines()[2:5]] == [
        ["US", "United", "States", "900", "90.0%"],
        ["..", "2", "other", "countries", "100", "10.0%"],
        ["--", "unresolved", "0", "0.0%"],
    ]
    assert text.splitlines()[-1] == "newest row: 2026-11-22T11:55:00.000000Z (5 min ago)"
    assert render_stats(Stats([], {}, None), NOW) == "geo_cache is empty"


@pytest.mark.parametrize(
    ("seconds", "shown"), [(42, "42 s"), (300, "5 min"), (3 * 3600, "3 h"), (3 * 86400, "3 d")]
)
def test_age(seconds: int, shown: str) -> None:
    assert age((NOW - timedelta(seconds=seconds)).isoformat(), NOW) == shown


def test_missing_database_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "geo.sqlite3"
    for argv in (["stats", "--db", str(missing)], ["lookup", "--db", str(missing), "1.1.1.1"]):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out) == (1, "")
        assert err == (
            f"bangui-geo: database {missing} does not exist "
            "(set GEO_DB_PATH or --db; persistence creates it)\n"
        )
    assert not missing.parent.exists()  # read-only: nothing created


def test_database_without_the_table_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).close()
    code, _, err = run_cli(capsys, "stats", "--db", str(other))
    assert (code, err) == (1, f"bangui-geo: database {other} has no geo_cache table\n")


# --- dead letters and the progress bar ---------------------------------------------------------


def test_dead_letter_headers_of_ours_and_of_the_broker() -> None:
    ours = dead_letter_from(
        b'{"ip": "nope"}',
        "ip.seen",
        {
            "x-geo-reject-reason": "ip: Value error, not an IPv4 or IPv6 address: 'nope'",
            "x-geo-rejected-by": "resolver",
            "x-geo-original-queue": "geo.resolver.ip_seen",
            "x-geo-original-routing-key": "ip.seen",
        },
    )
    assert (ours.replay_key, ours.rejected_by, ours.original_queue) == (
        "ip.seen",
        "resolver",
        "geo.resolver.ip_seen",
    )
    broker = dead_letter_from(
        b"{}",
        "geo.upsert",
        {
            "x-death": [
                {
                    "count": 1,
                    "reason": "expired",
                    "queue": "geo.persistence.upsert",
                    "exchange": "bangui",
                    "routing-keys": ["geo.upsert"],
                }
            ]
        },
    )
    assert (broker.replay_key, broker.reason, broker.original_queue) == (
        "geo.upsert",
        "dead-lettered by the broker: expired",
        "geo.persistence.upsert",
    )
    bare = dead_letter_from(b"x", "", {})
    assert (bare.replay_key, bare.reason) == (None, "unknown")


def test_dead_letter_rendering_escapes_and_cuts_the_body() -> None:
    assert excerpt(b'{"ip":\n"1.2.3.4"}\x00', 12) == '{"ip":\\n"1.2....'
    letter = dead_letter_from(
        b"not json",
        "ip.seen",
        {
            "x-geo-reject-reason": "not valid JSON",
            "x-geo-rejected-by": "resolver",
            "x-geo-original-queue": "geo.resolver.ip_seen",
        },
    )
    assert render_letter(3, letter, body_chars=200).splitlines() == [
        "#3  routing key ip.seen  rejected by resolver from geo.resolver.ip_seen",
        "    reason: not valid JSON",
        "    body (8 bytes): not json",
    ]
    smuggled = dead_letter_from(
        b"{}",
        "geo.upsert",
        {
            "x-geo-reject-reason": "not bound",
            "x-geo-rejected-by": "persistence",
            "x-geo-original-queue": "geo.persistence.upsert",
            "x-geo-original-routing-key": "ip.seen",
        },
    )
    assert render_letter(1, smuggled, body_chars=10).splitlines() == [
        "#1  routing key geo.upsert  rejected by persistence from geo.persistence.upsert"
        " delivered as ip.seen",
        "    reason: not bound",
        "    body (2 bytes): {}",
        "    replay: kept: it reached geo.persistence.upsert as ip.seen, a route that queue is"
        " not bound for (a CC/BCC header)",
    ]


def test_progress_bar() -> None:
    stream = io.StringIO()
    bar = ProgressBar(2500, stream, enabled=True)
    bar.advance(1000)
    assert bar.render() == "[############..................]  40% 1,000/2,500 IPs"
    bar.advance(1500)
    bar.finish()
    assert stream.getvalue().endswith("\r[" + "#" * 30 + "] 100% 2,500/2,500 IPs\n")
    silent = io.StringIO()
    quiet = ProgressBar(10, silent, enabled=False)
    quiet.advance(10)
    quiet.finish()
    assert silent.getvalue() == ""


# --- stats: how many countries are shown ------------------------------------------------------


@pytest.fixture
async def many_countries(tmp_path: Path) -> Path:
    """25 countries, country number i holding i + 1 IPs: AA .. AY."""
    path = tmp_path / "countries.sqlite3"
    codes = [f"A{chr(ord('A') + i)}" for i in range(25)]
    rows = [
        row(f"198.18.{i}.{n}", code, f"Land {code}", Resolution.RESOLVED, 60)
        for i, code in enumerate(codes)
        for n in range(i + 1)
    ]
    repository = await SqliteGeoRepository.open(path)
    try:
        await repository.upsert_many(rows)
    finally:
        await repository.close()
    return path


def test_stats_shows_twenty_countries_unless_asked(
    many_countries: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def country_lines(*argv: str) -> list[str]:
        code, out, _ = run_cli(capsys, "stats", "--db", str(many_countries), *argv)
        assert code == 0
        table = out.splitlines()[2:]
        return table[: next(i for i, line in enumerate(table) if line.startswith("--"))]

    default = country_lines()
    assert len(default) == 21  # 20 countries and one line for the rest
    assert default[0].split()[:2] == ["AY", "Land"]
    assert default[-1].split() == ["..", "5", "other", "countries", "15", "4.6%"]
    assert len(country_lines("--top", "3")) == 4
    every = country_lines("--all")
    assert [line.split()[0] for line in every][-1] == "AA"
    assert len(every) == 25
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["stats", "--all", "--top", "3"])


# --- backup ------------------------------------------------------------------------------------


def test_backup_is_a_checked_copy(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "copy.sqlite3"
    code, out, err = run_cli(capsys, "backup", "--db", str(db_path), str(target))
    assert (code, err) == (0, "")
    assert out.startswith(f"backed up 6 rows of {db_path} to {target} (")
    with closing(sqlite3.connect(target)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert copy.execute("SELECT COUNT(*) FROM geo_cache").fetchone() == (6,)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == []


def test_backup_refuses_to_overwrite_or_copy_onto_itself(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "copy.sqlite3"
    target.write_text("keep me")
    code, _, err = run_cli(capsys, "backup", "--db", str(db_path), str(target))
    assert (code, err) == (2, f"bangui-geo: {target} exists; pass --force to replace it\n")
    assert target.read_text() == "keep me"
    code, _, err = run_cli(capsys, "backup", "--db", str(db_path), "--force", str(db_path))
    assert (code, err) == (2, f"bangui-geo: {db_path} is the database itself\n")
    code, _, _ = run_cli(capsys, "backup", "--db", str(db_path), "--force", str(target))
    assert code == 0
    with closing(sqlite3.connect(target)) as copy:
        assert copy.execute("SELECT COUNT(*) FROM geo_cache").fetchone() == (6,)
    missing = tmp_path / "none" / "copy.sqlite3"
    code, _, err = run_cli(capsys, "backup", "--db", str(db_path), str(missing))
    assert (code, err) == (2, f"bangui-geo: folder {missing.parent} does not exist\n")


@pytest.mark.parametrize(
    ("text", "seconds", "shown"),
    [("45s", 45, "45s"), ("30m", 1800, "30m"), ("12h", 43200, "12h"), ("7d", 604800, "1w"),
     ("2w", 1209600, "2w"), ("90m", 5400, "90m")],
)  # fmt: skip
def test_ages_parse_and_print_back(text: str, seconds: int, shown: str) -> None:
    age = parse_age(text)
    assert age is not None
    assert age.total_seconds() == seconds
    assert format_age(age) == shown
    assert parse_age(format_age(age)) == age


@pytest.mark.parametrize("text", ["", "7", "d", "1.5h", "-1d", "7 days", "1y"])
def test_what_is_not_an_age(text: str) -> None:
    assert parse_age(text) is None


def test_backup_says_postgresql_is_backed_up_with_pg_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEO_DB_URL", "postgresql://geo:secret-pw@127.0.0.1:5432/geo")
    code, out, err = run_cli(capsys, "backup", str(tmp_path / "copy.sqlite3"))
    assert (code, out) == (2, "")
    assert err == (
        "bangui-geo: geo_cache is in PostgreSQL (GEO_DB_URL): back it up with pg_dump; "
        "backup copies a SQLite file (--db FILE)\n"
    )
    assert not (tmp_path / "copy.sqlite3").exists()


# --- prune's AGE -------------------------------------------------------------------------------


@pytest.mark.parametrize("age", ["0s", "0d", "12h", "1439m", "99999999999d", "999999999999w"])
def test_prune_refuses_an_age_below_a_day_or_beyond_any_date(age: str) -> None:
    """last_seen is written once a day (a row seen a minute ago may say it was seen at 00:00),
    so an AGE under a day would delete rows of IPs seen today, "0d" every row; an AGE too big
    for a timedelta was an OverflowError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["prune", "--older-than", age, "--db", "x"])
    assert exit_info.value.code == 2


def test_prune_older_than_every_date_deletes_nothing(tmp_path: Path) -> None:
    """An AGE that reaches before year 1 (999999d) was an OverflowError traceback."""
    import asyncio

    from services.cli import prune
    from shared.settings import Settings

    db = tmp_path / "geo.sqlite3"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "CREATE TABLE geo_cache (ip TEXT PRIMARY KEY, country_code TEXT, country_name TEXT,"
            " asn TEXT, org TEXT, cached_at TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO geo_cache (ip, cached_at) VALUES ('8.8.8.8', '2024-01-01 00:00')")
        conn.commit()
    settings = Settings(db_path=db)
    line = asyncio.run(prune.prune(settings, timedelta(days=999_999), yes=True, interactive=False))
    assert line.startswith("no row of geo_cache was last seen before")
    assert parse_age("99999999999d") is None
