"""Turn a raw message body into a model, or into one short reason why it is rejected.

Kept apart from the AMQP plumbing so the parsing of hostile input is tested (and fuzzed)
without a broker; the reason ends up in the ``x-geo-reject-reason`` dead-letter header.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import Rejected

M = TypeVar("M", bound=BaseModel)

_MAX_REASON = 500


def describe(exc: ValidationError) -> str:
    """One line per problem, 'field: message', without echoing the (maybe huge) input."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    if exc.error_count() > 5:
        parts.append(f"... and {exc.error_count() - 5} more")
    reason = "; ".join(parts)
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def decode(model: type[M], body: bytes, max_bytes: int) -> M:
    if len(body) > max_bytes:
        raise Rejected(f"body is {len(body)} bytes, more than the {max_bytes} allowed")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise Rejected(f"not valid JSON: {exc.errors()[0]['msg']}") from None
        raise Rejected(describe(exc)) from None
