"""The agent's deployment files held against the code: the systemd unit passes
``systemd-analyze verify`` with no unknown setting, its command line is one the agent accepts,
its sandbox lets it write its state and read fail2ban's folder, and the compose ``agent``
profile mounts that folder read-only."""

from __future__ import annotations

import shlex
from configparser import ConfigParser
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from services.cli.main import build_parser
from shared.settings import Settings
from tests.systemd import read_unit, verify

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "bangui-geo-agent.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "agent.env.example"
COMPOSE_FILE = REPO / "docker-compose.yml"


def unit() -> ConfigParser:
    return read_unit(UNIT)


def test_the_unit_verifies_with_no_unknown_or_bad_setting(tmp_path: Path) -> None:
    done = verify(UNIT.name, UNIT.read_text(), tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_does_report_a_misspelled_setting(tmp_path: Path) -> None:
    text = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    done = verify(UNIT.name, text, tmp_path)
    assert "Unknown key" in done.stderr
    assert "ProtectSystm" in done.stderr


def agent_arguments(command: list[str]) -> Any:
    assert command[:2] == ["/opt/bangui-geo/.venv/bin/bangui-geo", "agent"], command
    return build_parser().parse_args(command[1:])


def test_the_unit_runs_the_agent_hardened_with_its_state_writable_and_fail2ban_readable() -> None:
    service = unit()["Service"]
    args = agent_arguments(shlex.split(service["ExecStart"]))
    state_folder = PurePosixPath(str(args.state)).parent
    assert service["StateDirectory"] == state_folder.name
    assert str(state_folder) == "/var/lib/" + service["StateDirectory"]
    assert str(state_folder) in service["ReadWritePaths"].split()
    assert str(PurePosixPath(str(args.fail2ban_db)).parent) in service["ReadOnlyPaths"].split()
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["User"] not in {"", "root", "0"}
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"]
    assert service["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/bangui-geo/agent.env"


def test_the_environment_file_example_sets_only_valid_settings() -> None:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key.startswith("GEO_"), key
            assert key.removeprefix("GEO_").lower() in Settings.model_fields, key
            values[key.removeprefix("GEO_").lower()] = value
    assert "amqp_url" in values
    Settings(**values)


def volume(spec: str) -> tuple[str, tuple[str, bool]]:
    """``SOURCE:TARGET[:ro]`` as (target, (source, read-only)); SOURCE may hold ``${X:-y}``."""
    read_only = spec.endswith(":ro")
    source, _, target = spec.removesuffix(":ro").rpartition(":")
    return target, (source, read_only)


def test_the_compose_agent_profile_mounts_fail2ban_read_only() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    agent = services["agent"]
    assert agent["profiles"] == ["agent"]
    args = agent_arguments(["/opt/bangui-geo/.venv/bin/bangui-geo", *agent["command"][1:]])
    mounts = dict(volume(v) for v in agent["volumes"])
    db_folder = str(PurePosixPath(str(args.fail2ban_db)).parent)
    assert mounts[db_folder] == ("${FAIL2BAN_DB_DIR:-/var/lib/fail2ban}", True)
    state_folder = str(PurePosixPath(str(args.state)).parent)
    assert mounts[state_folder] == ("agent-state", False)  # a named volume, writable
    assert agent["cap_drop"] == ["ALL"]
    assert agent["cap_add"] == ["DAC_READ_SEARCH"]
    assert agent["read_only"] is True
