"""Reading docker-compose.yml and compose env files as ``docker compose`` does, for the tests
that hold the deployment files against the code: variable interpolation (``${V:-default}``, …),
a service's environment as a mapping, and KEY=VALUE env files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"

# The innermost braced expression: nested ones (${A:-${B}}) are resolved from the inside out.
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^{}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_ESCAPED_DOLLAR = "\0"


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, $$, and
    nested expressions such as ${V:-${W:-default}}."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("bare")
        parts = re.fullmatch(r"(\w+)(:-|-|:\?|\?|:\+|\+)?(.*)", expression, re.DOTALL)
        assert parts is not None, f"bad interpolation: {match.group(0)}"
        name, operator, argument = parts.groups()
        value = env.get(name)
        if value is not None:  # a value is used as it is, never interpolated again
            value = value.replace("$", _ESCAPED_DOLLAR)
        if operator in (":-", "-"):
            unset = value is None or (operator == ":-" and value == "")
            return argument if unset else str(value)
        if operator in (":?", "?"):
            if value is None or (operator == ":?" and value == ""):
                raise AssertionError(f"compose would stop: ${{{name}}} is required: {argument}")
            return value
        if operator in (":+", "+"):
            return argument if value else ""
        return value or ""

    text = text.replace("$$", _ESCAPED_DOLLAR)  # a literal $ is never an expression
    while (resolved := _VARIABLE.sub(substitute, text)) != text:
        text = resolved
    return text.replace(_ESCAPED_DOLLAR, "$")


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def read_env_file(path: Path) -> dict[str, str]:
    """A compose env file: KEY=VALUE lines, double-quoted values interpolated."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        values[key.strip()] = interpolate(value, values)
    return values


def load_raw_compose() -> dict[str, Any]:
    """docker-compose.yml as written, variables not yet interpolated."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded
