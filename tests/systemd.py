"""Reading and verifying the systemd units in deploy/systemd/, for the tests that hold them
against the code (``systemd-analyze verify`` needs no running systemd)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
INSTALLED_VENV = "/opt/bangui-geo/.venv/bin/"


def read_unit(path: Path) -> ConfigParser:
    """A unit as sections of settings; a setting given twice keeps its last value."""
    parser = ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def settings_named(path: Path, key: str) -> list[str]:
    """Every value of ``key`` in the unit, in order (EnvironmentFile may be given twice)."""
    return [
        line.partition("=")[2]
        for line in path.read_text().splitlines()
        if line.partition("=")[0].strip() == key
    ]


def verify(name: str, text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``text`` with ExecStart's program pointed at this Python's
    virtualenv (verify insists that it exists), arguments unchanged."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd", pytrace=False)
    bin_dir = str(Path(sys.executable).parent) + "/"
    assert (Path(bin_dir) / "bangui-geo").exists(), f"{bin_dir}bangui-geo missing: pip install -e ."
    path = folder / name
    path.write_text(text.replace(INSTALLED_VENV, bin_dir))
    return subprocess.run(
        [tool, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
