"""The one error the CLI reports as a single line (no traceback), with its exit code; any
password in the line (an ``--amqp-url`` or a setting echoed back) is masked here."""

from __future__ import annotations

from shared.redaction import redact

EXIT_OK = 0
EXIT_FAILED = 1  # the broker, the database or a publish failed
EXIT_USAGE = 2  # bad input or setting (argparse uses 2 as well)


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
