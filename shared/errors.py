"""The two ways a handler can fail, which decide what happens to the message.

``Rejected``: the message can never succeed, so it goes to ``geo.dead_letter`` with the reason.
``Transient``: the world is not ready (broker confirm timed out, database locked), so the
message is requeued after a back-off and nothing is lost.
"""

from __future__ import annotations


class Rejected(Exception):
    """The message can never be processed; it belongs in ``geo.dead_letter``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Transient(Exception):
    """Processing failed for a reason that may pass; requeue the message after a back-off."""


class StartupError(Exception):
    """The service cannot start for a reason the operator must fix; logged as one line."""


class SettingRefused(StartupError):
    """What a setting points at refused it at start (the broker refused the login or the vhost
    of ``GEO_AMQP_URL``): final, as a bad value is. One line naming the variable, exit 2; the
    message never holds a password."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(reason)
        self.variable = variable
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.variable}: {self.reason}"


class TopologyMismatch(StartupError):
    """A queue exists on the broker with other arguments than this version declares."""


class TopologyLost(StartupError):
    """An exchange, queue or binding the service needs is missing and its user may not create
    it (the broker definitions own the topology); the message names it and who must."""


class ServiceFault(Exception):
    """The service stopped itself because something it needs was lost while it ran (e.g. the
    topology); logged as one line, exit code 1."""
