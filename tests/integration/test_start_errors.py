"""A setting the world refuses stops a service at start as a bad value does: one line naming the
variable, exit 2, no traceback, no password, and no thirty attempts first."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from bangui_geo.testing import REPO_ROOT, service_env

pytestmark = pytest.mark.integration

SECRET = "S3cr3t-not-the-password"


def with_login(url: str, user: str, password: str, vhost: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path if vhost is None else vhost, "", ""))


def plain_lines(stderr: str) -> list[str]:
    """What a service wrote to stderr besides its JSON log events."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def start(service: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - began


@pytest.mark.parametrize("service", ["resolver", "timer", "persistence"])
def test_a_wrong_password_is_final_at_start(service: str, amqp_url: str, tmp_path: Path) -> None:
    url = with_login(amqp_url, "guest", SECRET)
    done, took = start(service, service_env(url, tmp_path / "geo.sqlite3"))
    endpoint = f"{urlsplit(amqp_url).hostname}:{urlsplit(amqp_url).port or 5672}"
    assert done.returncode == 2, done.stderr
    assert plain_lines(done.stderr) == [
        f"{service}: invalid setting GEO_AMQP_URL: the broker refused the login of user 'guest' "
        f"(wrong user or password) at {endpoint}{urlsplit(amqp_url).path or '/'}"
    ]
    assert SECRET not in done.stdout + done.stderr
    assert "amqp_connect_failed" not in done.stderr  # refused once, not retried
    assert took < 20  # not thirty attempts over a minute (generous: interpreter start-up)


def test_a_missing_vhost_is_final_at_start(amqp_url: str, tmp_path: Path) -> None:
    parts = urlsplit(amqp_url)
    url = with_login(amqp_url, parts.username or "guest", parts.password or "guest", "/no-such")
    done, _ = start("timer", service_env(url, tmp_path / "geo.sqlite3"))
    assert done.returncode == 2, done.stderr
    assert plain_lines(done.stderr) == [
        "timer: invalid setting GEO_AMQP_URL: the broker refused vhost 'no-such' (it does not "
        f"exist, or the user may not use it) at {parts.hostname}:{parts.port or 5672}/no-such"
    ]


def test_the_cli_says_a_refused_login_is_a_bad_setting(amqp_url: str, tmp_path: Path) -> None:
    url = with_login(amqp_url, "guest", SECRET)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "publish", "--amqp-url", url, "8.8.8.8"],
        cwd=REPO_ROOT,
        env=service_env(url, tmp_path / "geo.sqlite3"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert "login refused (check the user and password)" in done.stderr
    assert SECRET not in done.stderr
