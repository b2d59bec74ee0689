"""Start checks that need no broker, by the real start commands: an unusable GEO_DB_PATH or
GEO_MMDB_PATH, or an agent's unreadable state file or fail2ban database, is one line and exit 2
before any connection is tried (the broker URL points at a closed port)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bangui_geo.testing import REPO_ROOT, service_env
from bangui_geo.testing.agent import run_agent_once


def start(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def agent_env(amqp_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return service_env(amqp_url, tmp_path / "unused.sqlite3", **extra)


def not_a_database(path: Path) -> Path:
    path.write_text("[Definition]\nlogtarget = /var/log/fail2ban.log\n")
    return path


def a_folder(path: Path) -> Path:
    path.mkdir()
    return path


def under_a_file(path: Path) -> Path:
    path.write_text("")
    return path / "data" / "geo.sqlite3"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (not_a_database, "{db} is not a SQLite database (file is not a database)"),
        (a_folder, "{db} is a folder, not a database file"),
        (under_a_file, "cannot create the folder {parent}: Not a directory"),
    ],
    ids=["not-a-database", "a-folder", "folder-under-a-file"],
)
def test_an_unusable_database_path_is_one_settings_line(
    make: Callable[[Path], Path], says: str, tmp_path: Path
) -> None:
    db = make(tmp_path / "geo.sqlite3")
    before = db.read_bytes() if db.is_file() else None
    # No broker is needed (or reached): the path is checked first.
    done = start("persistence", service_env("amqp://guest:guest@127.0.0.1:1/", db))
    assert done.returncode == 2, done.stderr
    message = says.format(db=db, parent=db.parent)
    assert done.stderr.splitlines() == [f"persistence: invalid setting GEO_DB_PATH: {message}"]
    if before is not None:
        assert db.read_bytes() == before  # looked at, never written


def test_missing_file_stops_the_resolver_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "GeoLite2-Country.mmdb"
    # No broker is needed: the resolver must give up before it tries to connect.
    env = service_env(
        "amqp://guest:guest@127.0.0.1:9/",
        tmp_path / "geo.sqlite3",
        GEO_PROVIDER="mmdb",
        GEO_MMDB_PATH=str(missing),
    )
    done = subprocess.run(
        [sys.executable, "-m", "services.resolver"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"resolver: invalid setting GEO_MMDB_PATH: cannot read {missing}: No such file or directory"
    ]


def test_an_unreadable_state_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.mkdir()
    done = run_agent_once(
        agent_env("amqp://guest:guest@127.0.0.1:1/", tmp_path),
        ["--fail2ban-db", str(tmp_path / "none.sqlite3"), "--state", str(state)],
    )
    assert (done.returncode, done.stderr) == (
        2,
        f"bangui-geo: cannot read state file {state}: Is a directory\n",
    )


def write_sqlite(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(statement)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda p: p.write_text("[Definition]\nlogtarget = /var/log/fail2ban.log\n"),
            "{db} is not a fail2ban database (not SQLite: file is not a database)",
        ),
        (
            lambda p: write_sqlite(p, "CREATE TABLE geo_cache(ip TEXT)"),
            "{db} is not a fail2ban database (no bans or fail2banDb table)",
        ),
        (lambda p: p.mkdir(), "cannot read {db}: it is a directory, not a database file"),
    ],
    ids=["text-file", "other-sqlite", "directory"],
)
def test_a_bad_database_is_one_line_and_exit_2(
    make: Callable[[Path], None], expected: str, tmp_path: Path
) -> None:
    database = tmp_path / "fail2ban.sqlite3"
    make(database)
    done = run_agent_once(
        agent_env("amqp://guest:guest@127.0.0.1:1/", tmp_path),
        ["--fail2ban-db", str(database), "--state", str(tmp_path / "state.json")],
    )
    assert (done.returncode, done.stderr) == (2, f"bangui-geo: {expected.format(db=database)}\n")
    assert not (tmp_path / "state.json").exists()
