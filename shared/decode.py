"""Turn a raw message body into a model, or into one short reason why it is rejected.

Kept apart from the AMQP plumbing so the parsing of hostile input is tested (and fuzzed)
without a broker; the reason ends up in the ``x-geo-reject-reason`` dead-letter header.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import Rejected

M = TypeVar("M", bound=BaseModel)

_MAX_REASON = 500
_LONG_EXPECTATION = 60  # longer patterns and value lists are not echoed into the reason


def describe(exc: ValidationError) -> str:
    """One line per problem, 'field: message', without echoing the (maybe huge) input."""
    parts: list[str] = []
    seen: set[str] = set()
    for error in exc.errors(include_url=False, include_input=False):
        # Drop the union branch names pydantic puts in a location ("constrained-str", ...).
        where = ".".join(str(p) for p in error["loc"] if not _is_branch(p)) or "body"
        if where in seen:
            continue  # another branch of the same union: its first complaint is enough
        seen.add(where)
        message = error["msg"]
        if len(message) > _LONG_EXPECTATION and error["type"] in _SHAPE_ERRORS:
            message = _SHAPE_ERRORS[error["type"]]
        parts.append(f"{where}: {message}")
    shown = parts[:5]
    if len(parts) > 5:
        shown.append(f"... and {len(parts) - 5} more")
    reason = "; ".join(shown)
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


_SHAPE_ERRORS = {
    "string_pattern_mismatch": "String is not in the allowed form",
    "literal_error": "Input is not one of the allowed values",
}


def _is_branch(part: str | int) -> bool:
    return isinstance(part, str) and ("-" in part or "[" in part)


def decode(model: type[M], body: bytes, max_bytes: int) -> M:
    if len(body) > max_bytes:
        raise Rejected(f"body is {len(body)} bytes, more than the {max_bytes} allowed")
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise Rejected(f"not valid JSON: {exc.errors()[0]['msg']}") from None
        raise Rejected(describe(exc)) from None
    repeated = repeated_key(model, body)
    if repeated is not None:
        # JSON parsers disagree on which copy wins (ours: the last): refuse rather than guess.
        raise Rejected(f"duplicate key {repeated!r} in one object")
    return parsed


# A key with an escape in it ("\u0069p" is "ip"): a backslash, the rest of a string, a colon.
_ESCAPED_KEY = re.compile(rb'\\.(?:[^"\\]|\\.)*"\s*:')


def repeated_key(model: type[BaseModel], body: bytes) -> str | None:
    """A key given twice in one object of ``body``, if any (None: no repeat that matters).

    ``body`` is valid JSON (pydantic parsed it). The usual body has a single object whose keys
    are spelled without escapes: then a field given twice shows as two copies of its quoted name,
    found with a byte search per top-level field (the decode's only added cost), and a repeated
    key the model ignores changes nothing. Nested objects, escaped keys or a second copy of a
    field name fall back to an exact parse, which refuses any repeated key.
    """
    first = body.find(b"{")
    if body.find(b"{", first + 1) == -1 and (b"\\" not in body or not _ESCAPED_KEY.search(body)):
        for quoted in _quoted_top_level_names(model):
            at = body.find(quoted)
            if at != -1 and body.find(quoted, at + 1) != -1:
                break
        else:
            return None
    return _first_repeat(body)


@lru_cache(maxsize=32)
def _quoted_top_level_names(model: type[BaseModel]) -> tuple[bytes, ...]:
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return tuple(json.dumps(name).encode() for name in sorted(names))


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _first_repeat(body: bytes) -> str | None:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _Repeated(key)
            out[key] = value
        return out

    try:
        json.loads(body, object_pairs_hook=pairs)
    except _Repeated as found:
        return found.key
    except ValueError:  # what pydantic accepted, json refused (e.g. a lone surrogate): no repeat
        return None
    return None
