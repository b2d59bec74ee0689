"""The agent's position on disk: written to a temporary file, fsynced and renamed over the old
one (then the folder fsynced), so a crash at any moment leaves the old position or the new one."""

from __future__ import annotations

import os
from pathlib import Path

from services.agent.position import START, Position, dump_state, load_state


class StateUnusable(Exception):
    """The state file or its folder cannot be read or written: one line for the operator."""


def read_state(path: Path, database: Path) -> Position:
    """The saved position; ``START`` when there is none. Raises ``StateCorrupt`` (a
    ``ValueError``) for a file that is not a state, ``StateUnusable`` for an unreadable one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return START
    except UnicodeDecodeError:
        text = "\x00"  # not text: load_state calls it corrupt
    except OSError as exc:
        raise StateUnusable(f"cannot read state file {path}: {exc.strerror or exc}") from None
    return load_state(text, str(database))


def check_writable(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateUnusable(f"cannot create state folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StateUnusable(f"cannot write state folder {folder}: permission denied")


def save_state(path: Path, position: Position, database: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    data = dump_state(position, str(database)).encode()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
