"""A service's HTTP side as a test reads it: a free loopback port for ``GEO_METRICS_PORT``, one
GET of ``/metrics`` or ``/health``, and a value picked out of the Prometheus text."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    """The status and body of ``GET http://127.0.0.1:PORT/PATH`` (an error status too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels…}`` in a /metrics text; fails when it is absent."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics")


def scraped(port: int, name: str, *, timeout: float = 5) -> float | None:
    """The first sample of ``name`` a service on ``port`` serves now; None while nothing
    answers there (within ``timeout`` seconds) or it has no such sample yet."""
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None
