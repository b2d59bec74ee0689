"""Process lifecycle shared by the three services: settings, logging, signals, bounded shutdown.

SIGTERM/SIGINT set a stop event; the service body then stops consuming, drains in-flight work
(bounded by ``GEO_DRAIN_TIMEOUT``) and closes what it opened. A hard cap makes sure the process
exits within ``SHUTDOWN_CAP`` seconds of the signal, as the contract promises (10 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from shared.errors import ServiceFault, SettingRefused, StartupError
from shared.logging import configure_logging
from shared.settings import Settings, SettingsError, load_settings

SHUTDOWN_CAP = 9.5

ServiceBody = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


def main(service: str, body: ServiceBody, checks: Sequence[Callable[[Settings], None]] = ()) -> int:
    """Entry point of ``python -m services.<service>``; returns the process exit code.

    ``checks`` are the service's own start checks; they raise ``SettingsError`` like a bad value.
    """
    try:
        settings = load_settings()
        for check in checks:
            check(settings)
    except SettingsError as exc:
        print(f"{service}: invalid setting {exc}", file=sys.stderr)
        return 2
    configure_logging(service, fmt=settings.log_format, level=settings.log_level)
    try:
        return asyncio.run(run_service(service, settings, body))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return 130


async def run_service(service: str, settings: Settings, body: ServiceBody) -> int:
    log = structlog.get_logger(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, log, signum)
    task = asyncio.create_task(body(settings, stop), name=f"{service}-body")
    stop_wait = asyncio.create_task(stop.wait())
    log.info("service_started", pid=os.getpid())
    try:
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=SHUTDOWN_CAP)
            except TimeoutError:
                log.error("service_shutdown_forced", cap_s=SHUTDOWN_CAP)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return 1
        task.result()
    except SettingRefused as exc:  # as final as a bad value: the same line, the same code
        print(f"{service}: invalid setting {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # the operator's to fix: one line, no traceback
        log.error("service_start_failed", reason=str(exc))
        return 1
    except ServiceFault as exc:  # stopped itself on purpose, after a graceful drain
        log.error("service_failed", reason=str(exc))
        return 1
    except Exception as exc:
        log.exception("service_crashed", error=repr(exc))
        return 1
    finally:
        stop_wait.cancel()
    log.info("service_stopped")
    return 0


def _request_stop(
    stop: asyncio.Event, log: structlog.typing.FilteringBoundLogger, signum: int
) -> None:
    if not stop.is_set():
        log.info("service_shutdown_started", signal=signal.Signals(signum).name)
    stop.set()
