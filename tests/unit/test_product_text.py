"""The product speaks of itself: no help text, report, docstring or doc points at our tracker.

Users of bangui-geo don't know our issue numbers; a figure or a rule says what it is instead."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACKER_REFERENCE = re.compile(r"\b(issue|task|ticket)s? #?\d+|the issue'?s?\b", re.IGNORECASE)
SCANNED = ("services", "shared", "bench", "scripts", "deploy", "tests")
TOP_LEVEL = ("README.md", "docker-compose.yml", "Dockerfile", "pyproject.toml", "asyncapi.yaml")
SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".conf", ".json", ".service", ".sh", ""}


def product_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL if (ROOT / name).exists()]
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*"):
            if (
                path.is_file()
                and path.suffix in SUFFIXES
                and "__pycache__" not in path.parts
                and path != Path(__file__).resolve()
            ):
                files.append(path)
    return files


def test_no_file_refers_to_the_tracker() -> None:
    files = product_files()
    assert len(files) > 50  # the scan really covers the tree
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if TRACKER_REFERENCE.search(line)
    ]
    assert hits == []
