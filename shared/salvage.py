"""Keeping the good addresses of a bulk ``ip.seen`` that holds a few bad ones.

A bulk import with one typo should not lose its other 999 addresses: the valid ones go on as an
``IpSeen`` of their own, and only the invalid ones are dead-lettered, as an ``ip.seen`` body with
their original positions, so an operator can fix and republish them. Pure: parsing only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.ipnorm import normalize_ip
from shared.messages import MAX_IPS_PER_MESSAGE, IpSeen

POSITIONS_FIELD = "original_indexes"
_MAX_REASON = 500


@dataclass(frozen=True)
class Salvage:
    kept: IpSeen  # the valid addresses, in their order
    rejected_body: bytes  # an ip.seen body holding only the invalid entries, and where they were
    reason: str
    invalid: int


def salvage_ip_seen(body: bytes) -> Salvage | None:
    """The split of a rejected ``ip.seen`` into its valid and invalid addresses, or None when
    the message is wrong as a whole (not an object, no ``ips`` list, too many, none valid or
    none invalid): then it is dead-lettered whole, as before."""
    try:
        document = json.loads(body, object_pairs_hook=_refuse_duplicates)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or document.get("ip") is not None:
        return None
    entries = document.get("ips")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_IPS_PER_MESSAGE:
        return None
    kept: list[str] = []
    bad: list[tuple[int, Any, str]] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            bad.append((index, entry, "Input should be a valid string"))
            continue
        try:
            kept.append(normalize_ip(entry))
        except ValueError as exc:
            bad.append((index, entry, f"Value error, {exc}"))
    if not kept or not bad:
        return None
    try:
        seen = IpSeen.model_validate({**document, "ips": kept})
    except ValueError:  # another field is wrong too: the message is wrong as a whole
        return None
    rest = {k: v for k, v in document.items() if k not in ("ips", POSITIONS_FIELD)}
    rejected = {**rest, "ips": [e for _, e, _ in bad], POSITIONS_FIELD: [i for i, _, _ in bad]}
    details = "; ".join(f"ips.{index}: {why}" for index, _, why in bad)
    reason = f"{len(bad)} of {len(entries)} addresses invalid, the other {len(kept)} kept: "
    reason += details
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    return Salvage(seen, json.dumps(rejected, ensure_ascii=False).encode(), reason, len(bad))


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate key")  # wrong as a whole: let the whole message go
    return dict(pairs)
