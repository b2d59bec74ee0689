"""The three services' systemd units held against the code: each passes ``systemd-analyze
verify``, starts its service by the contract's start command, is hardened, and its environment
files name only settings the code knows, which together validate."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import pytest

from shared.settings import Settings
from tests.systemd import INSTALLED_VENV, UNITS, read_unit, settings_named, verify

SERVICES = ("resolver", "timer", "persistence")
DRAIN_BOUND_S = 10  # the contract: a service exits within 10 s of SIGTERM


def unit_path(service: str) -> Path:
    return UNITS / f"bangui-geo-{service}.service"


def env_file(name: str) -> dict[str, str]:
    values = {}
    for line in (UNITS / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@pytest.mark.parametrize("service", SERVICES)
def test_the_unit_verifies_with_no_unknown_or_bad_setting(service: str, tmp_path: Path) -> None:
    path = unit_path(service)
    done = verify(path.name, path.read_text(), tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_does_report_a_misspelled_setting(tmp_path: Path) -> None:
    path = unit_path("timer")
    text = path.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    done = verify(path.name, text, tmp_path)
    assert "Unknown key" in done.stderr
    assert "NoNewPrivilege" in done.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_the_unit_starts_the_service_hardened(service: str) -> None:
    unit = read_unit(unit_path(service))["Service"]
    assert shlex.split(unit["ExecStart"]) == [
        f"{INSTALLED_VENV}python",
        "-m",
        f"services.{service}",
    ]
    assert unit["User"] not in {"", "root", "0"}
    assert unit["ProtectSystem"] == "strict"
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["CapabilityBoundingSet"] == ""  # no capability at all
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == "2"  # a bad setting is not retried
    assert float(unit["TimeoutStopSec"].removesuffix("s")) > DRAIN_BOUND_S
    files = [f.lstrip("-") for f in settings_named(unit_path(service), "EnvironmentFile")]
    assert files == ["/etc/bangui-geo/geo.env", f"/etc/bangui-geo/{service}.env"]


def test_only_persistence_may_write_and_only_its_database_folder() -> None:
    db_path = PurePosixPath(env_file("geo.env.example")["GEO_DB_PATH"])
    persistence = read_unit(unit_path("persistence"))["Service"]
    assert persistence["ReadWritePaths"].split() == [str(db_path.parent)]
    assert str(db_path.parent) == "/var/lib/" + persistence["StateDirectory"]
    for service in ("resolver", "timer"):
        unit = read_unit(unit_path(service))["Service"]
        assert "ReadWritePaths" not in unit
        assert "StateDirectory" not in unit


@pytest.mark.parametrize("service", SERVICES)
def test_the_environment_files_name_known_settings_that_validate(service: str) -> None:
    shared, own = env_file("geo.env.example"), env_file(f"{service}.env.example")
    for key in [*shared, *own]:
        assert key.startswith("GEO_"), key
        assert key.removeprefix("GEO_").lower() in Settings.model_fields, key
    merged = {k.removeprefix("GEO_").lower(): v for k, v in {**shared, **own}.items()}
    settings = Settings(**merged)
    user = re.match(r"amqps?://([^:@/]+)", own["GEO_AMQP_URL"])
    assert user is not None
    assert user.group(1) == f"geo-{service}"  # the user definitions.json gives this service
    assert str(settings.db_path) == shared["GEO_DB_PATH"]


def test_every_service_has_its_own_metrics_port() -> None:
    ports = [env_file(f"{name}.env.example")["GEO_METRICS_PORT"] for name in SERVICES]
    ports.append(env_file("agent.env.example")["GEO_METRICS_PORT"])
    assert len(set(ports)) == len(ports)
