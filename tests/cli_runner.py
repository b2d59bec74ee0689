"""The ``bangui-geo`` command run in the test's own process, for tests that need its exit code
and output without a subprocess (it runs its own event loop, so those tests are not async)."""

from __future__ import annotations

import pytest

from services.cli import main as cli


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    *a: str,
) -> tuple[int, str, str]:
    """``bangui-geo A...`` with ``env`` set for the call: (exit code, stdout, stderr)."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code = cli.main(list(a))
    out, err = capsys.readouterr()
    return code, out, err
