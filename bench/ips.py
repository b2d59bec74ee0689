"""The benchmark's ``ip.seen`` bodies: one address per message, as a fail2ban action publishes
them, or lists, as an importer does. The addresses come from ``bangui_geo.testing.public_ips``,
the one generator the tests use too."""

from __future__ import annotations

import json


def single_bodies(ips: list[str]) -> list[bytes]:
    """One ``ip.seen`` per address, as a fail2ban action publishes them."""
    return [json.dumps({"ip": ip}).encode() for ip in ips]


def bulk_bodies(ips: list[str], per_message: int) -> list[bytes]:
    """``ip.seen`` messages of ``per_message`` addresses each, as an importer publishes them."""
    return [
        json.dumps({"ips": ips[i : i + per_message]}).encode()
        for i in range(0, len(ips), per_message)
    ]
