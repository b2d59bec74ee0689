"""Ages written the way operators write them (``45s``, ``30m``, ``12h``, ``7d``, ``2w``), for
``agent --since`` and ``dead-letters purge --older-than``."""

from __future__ import annotations

import re
from datetime import timedelta

_AGE = re.compile(r"^(?P<n>\d+)(?P<unit>[smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta | None:
    """The age ``text`` names, or None when it is not written as an age."""
    match = _AGE.match(text.strip())
    if match is None:
        return None
    try:
        return timedelta(**{_UNITS[match["unit"]]: int(match["n"])})
    except OverflowError:  # beyond timedelta's ~2.7 million years: no age anyone means
        return None


def format_age(age: timedelta) -> str:
    """``age`` in the largest unit that writes it whole, as ``parse_age`` reads it."""
    seconds = int(age.total_seconds())
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
