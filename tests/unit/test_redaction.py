"""No broker or database password is ever printed: not in a settings error line (however
malformed the URL, from the environment or a secrets file), not by the CLI, not in a log event,
an exception's traceback or a library's log record. The real start commands and the real CLI
are run and their whole output searched for the password."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.redaction import redact, redact_url
from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "S3cr3tPW"

# Each is refused at start, with the password (or a piece of it) in the value.
MALFORMED = {
    "no colon after the scheme": f"amqps//geo:{PASSWORD}@127.0.0.1/v",
    "/ in the password": f"amqp://geo:{PASSWORD[:3]}/{PASSWORD[3:]}@127.0.0.1/v",
    "# in the password": f"amqp://geo:{PASSWORD[:3]}#{PASSWORD[3:]}@127.0.0.1/v",
    "# first in the password": f"amqp://geo:#{PASSWORD}@127.0.0.1/v",
    "? in the password": f"amqp://geo:{PASSWORD[:3]}?{PASSWORD[3:]}@127.0.0.1/v",
    "a space in the password": f"amqp://geo:{PASSWORD[:3]} {PASSWORD[3:]}@127.0.0.1/v",
    "port out of range": f"amqp://geo:{PASSWORD}@127.0.0.1:99999/v",
    "second node of a list": f"amqp://geo:{PASSWORD}@a/v,amqp://geo:{PASSWORD[:3]}/x@b/v",
}
UNPARSEABLE = {k: v for k, v in MALFORMED.items() if k != "no colon after the scheme"}


def leaked(text: str) -> bool:
    """Whether ``text`` shows the password, or the piece before a reserved character."""
    return PASSWORD in text or PASSWORD[:3] in text


def start(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", service],
        cwd=REPO_ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"(got 'amqps//geo:{PASSWORD}@127.0.0.1/v')", "(got 'amqps//geo:***@127.0.0.1/v')"),
        (f"amqp://geo:ab/cd#{PASSWORD}@h:5672/v", "amqp://geo:***@h:5672/v"),
        (f"amqp://u:{PASSWORD}@a/v,amqps://w:{PASSWORD}@b/v", "amqp://u:***@a/v,amqps://w:***@b/v"),
        (
            f'{{"error": "at amqp://u:{PASSWORD}@h/v: refused"}}',
            '{"error": "at amqp://u:***@h/v: refused"}',
        ),
        (f"postgresql://app:{PASSWORD}@db:5432/geo", "postgresql://app:***@db:5432/geo"),
        (f"postgres://app:{PASSWORD}@db/geo", "postgres://app:***@db/geo"),
        (f"amqp:geo:{PASSWORD}@h/v", "amqp:geo:***@h/v"),
        (f"https://key:{PASSWORD}@pro.example/json", "https://key:***@pro.example/json"),
        ("amqp://guest@h/v and amqp://h:5672/v, mail ops@example.org", None),
    ],
)
def test_the_password_of_every_url_in_a_text_is_masked(text: str, shown: str | None) -> None:
    assert redact(text) == (text if shown is None else shown)


def test_a_setting_value_is_masked_whole_even_with_white_space_in_the_password() -> None:
    value = f'amqp://geo:{PASSWORD[:3]} {PASSWORD[3:]}@h/v, amqps://geo:x"{PASSWORD}@h2/v'
    assert redact_url(value) == "amqp://geo:***@h/v, amqps://geo:***@h2/v"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_broker_url_stops_the_timer_with_one_redacted_line(case: str) -> None:
    result = start("services.timer", {"GEO_AMQP_URL": MALFORMED[case]})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("timer: invalid setting GEO_AMQP_URL: "), output
    assert "geo:***@" in lines[0]
    assert not leaked(output), output
    assert "Traceback" not in output
    if case in UNPARSEABLE:
        assert "cannot be parsed as a URL" in lines[0]
        assert "percent-encode" in lines[0]


@pytest.mark.parametrize("service", ["services.resolver", "services.persistence"])
def test_every_service_redacts_its_settings_line(service: str) -> None:
    result = start(service, {"GEO_AMQP_URL": MALFORMED["/ in the password"]})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "GEO_AMQP_URL" in result.stderr
    assert not leaked(result.stdout + result.stderr), result.stderr


def test_a_malformed_url_from_a_secrets_file_is_redacted_too(tmp_path: Path) -> None:
    (tmp_path / "geo_amqp_url").write_text(MALFORMED["no colon after the scheme"] + "\n")
    result = start("services.timer", {"GEO_SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.startswith("timer: invalid setting GEO_AMQP_URL: "), result.stderr
    assert not leaked(result.stdout + result.stderr), result.stderr


@pytest.mark.parametrize("case", ["no colon after the scheme", "/ in the password"])
def test_the_cli_redacts_a_malformed_url_from_the_option_and_the_environment(case: str) -> None:
    url = MALFORMED[case]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    for argv, env in (
        (["publish", "--amqp-url", url, "198.51.100.1"], clean),
        (["dead-letters", "list"], {**clean, "GEO_AMQP_URL": url}),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *argv],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert not leaked(done.stdout + done.stderr), done.stderr


def test_a_parseable_url_with_the_reserved_characters_encoded_is_accepted() -> None:
    encoded = "amqp://geo:S3c%2Fr3t%23PW%3F@127.0.0.1:5672/v"
    assert Settings(amqp_url=encoded).amqp_url == encoded
    accepted = "amqp://geo:p@ss@h/v"  # an unencoded @ was read as part of the password before
    assert Settings(amqp_url=accepted).amqp_url == accepted


def test_a_service_that_cannot_reach_its_broker_logs_no_password() -> None:
    """The log events of a start that retries (host, port and vhost shown; the password not)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: refused
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEO_")}
    clean.update(GEO_AMQP_URL=f"amqp://geo:{PASSWORD}@127.0.0.1:{port}/v", GEO_LOG_FORMAT="json")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.timer"],
        cwd=REPO_ROOT,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if '"amqp_connect_failed"' in line:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=30)
    output = "".join(seen) + rest
    assert '"amqp_connect_failed"' in output, output
    assert not leaked(output), output


LOGGING_SCRIPT = """
import logging, sys
import structlog
from shared.logging import configure_logging
configure_logging("probe", fmt=sys.argv[1], level="info")
url = sys.argv[2]
log = structlog.get_logger("probe")
log.warning("amqp_connect_failed", error=f"cannot connect to {url}", broker=url)
try:
    raise ConnectionError(f"refused by {url}")
except ConnectionError:
    log.exception("service_crashed")
logging.getLogger("aiormq.connection").error("Connection to %s closed", url)
try:
    raise ValueError(url)
except ValueError:
    logging.getLogger("aio_pika.robust_connection").exception("Connection attempt failed")
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_events_tracebacks_and_library_records_are_redacted(fmt: str) -> None:
    url = f"amqp://geo:{PASSWORD}@broker:5672/bangui"
    done = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, fmt, url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    output = done.stdout + done.stderr
    for expected in ("amqp_connect_failed", "service_crashed", "ConnectionError", "closed"):
        assert expected in output, output
    assert "Traceback" in output  # the tracebacks were printed, with the URL masked in them
    assert output.count("amqp://geo:***@broker:5672/bangui") >= 5, output
    assert not leaked(output), output
