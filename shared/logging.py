"""structlog configuration, called once per process: JSON in production, readable on a terminal.

Every line is redacted as the very last step, after rendering (structlog's events and the
standard library's records from aio-pika and aiormq alike), so no event, exception text or
traceback can print a broker or database password, whoever wrote it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from shared.redaction import redact


def configure_logging(service: str, *, fmt: str = "auto", level: str = "info") -> None:
    """Route structlog (and stdlib logging from libraries) to stderr with ``service`` bound."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if use_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
            redact_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])


def redact_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """The last processor: the rendered line (text) with every password masked."""
    if isinstance(rendered, str):
        return redact(rendered)
    if isinstance(rendered, bytes):
        return redact(rendered.decode("utf-8", "replace")).encode()
    return rendered


class RedactingFormatter(logging.Formatter):
    """Standard-library records (aio-pika, aiormq), formatted then redacted, traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
