"""Credentials out of every line we print: the password of any broker or database URL in a text
is replaced by ``***`` before the text reaches a terminal or a log.

The URLs are found by their scheme, not parsed: a value that failed validation (``amqps//u:pw@h``,
a password with an unencoded ``/`` or ``#``) is exactly the one an error line shows, so the
userinfo is taken to run up to the last ``@`` of the URL, however malformed the rest is.
"""

from __future__ import annotations

import re

MASK = "***"

# Schemes whose userinfo we mask even when the separator after them is malformed (amqps//,
# amqp:/, amqp:); any other scheme only in its regular form (scheme://user:password@).
_CREDENTIAL_SCHEMES = r"amqps?|postgres(?:ql)?"
_START = re.compile(
    rf"\b(?:(?:{_CREDENTIAL_SCHEMES})(?::?/{{1,2}}|:(?=[^\s/]))|[a-z][a-z0-9+.\-]*://)",
    re.IGNORECASE,
)
# Where a URL inside free text ends: white space, a double quote or a backslash (the string's end
# or an escape in a JSON line), angle brackets. Not at a single quote or a bracket: a password may
# hold those, and running on to a later "@" only masks more than needed.
_END = re.compile(r"""[\s"<>\\]""")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked (the user name is kept)."""
    if "@" not in text:
        return text
    out: list[str] = []
    pos = 0
    while (start := _START.search(text, pos)) is not None:
        out.append(text[pos : start.end()])
        end = _END.search(text, start.end())
        stop = len(text) if end is None else end.start()
        following = _START.search(text, start.end(), stop)  # a list: u1,amqp://u2
        if following is not None:
            stop = following.start()
        out.append(_mask_userinfo(text[start.end() : stop]))
        pos = stop
    out.append(text[pos:])
    return "".join(out)


def redact_url(value: str) -> str:
    """``value``, taken as a whole to be one URL or a comma-separated list of them (a setting's
    value), with each password masked: unlike ``redact``, white space or quotes in a password
    do not end the URL early."""
    if "@" not in value:
        return value
    parts = re.split(rf"(,\s*(?=(?:{_CREDENTIAL_SCHEMES})\b))", value, flags=re.IGNORECASE)
    masked = []
    for part in parts:
        start = _START.match(part)
        if start is None:
            masked.append(redact(part))
        else:
            masked.append(part[: start.end()] + _mask_userinfo(part[start.end() :]))
    return "".join(masked)


def _mask_userinfo(rest: str) -> str:
    """``rest`` is what follows a scheme: ``user:password@host...``; keep the user."""
    at = rest.rfind("@")
    if at < 0:
        return rest
    userinfo = rest[:at]
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return rest  # a user name only
    return f"{user}:{MASK}{rest[at:]}"
