"""Where the integration tests get their RabbitMQ, and one fresh vhost per test.

``GEO_TEST_AMQP_URL`` wins; otherwise a ``rabbitmq:3-management`` container through
testcontainers where a Docker engine answers; otherwise the tests fail with the reason (never a
silent skip: CI must prove the services against a real broker). Vhosts are created through the
management HTTP API, or ``rabbitmqctl`` on the broker's own machine when the API is not enabled;
``rabbitmqctl`` for a container broker runs inside that container (``docker exec``), never on
the host, where it would reach the host's own node.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit


class BrokerUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerAdmin:
    """The broker's root URL (no vhost) and how to reach its management API."""

    amqp_url: str
    management_url: str
    user: str
    password: str
    # How to run rabbitmqctl against this broker: on this machine, or in the broker's container.
    ctl_prefix: tuple[str, ...] = ()

    def ctl(self) -> list[str] | None:
        """The rabbitmqctl command line for this broker, or None where there is none."""
        if self.ctl_prefix:
            return [*self.ctl_prefix, "rabbitmqctl"]
        ctl = shutil.which("rabbitmqctl")
        return [ctl] if ctl else None

    def url_for(self, vhost: str) -> str:
        parts = urlsplit(self.amqp_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))

    def _api(self, method: str, path: str, body: object | None = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.management_url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def api_available(self) -> bool:
        try:
            self._api("GET", "/api/overview")
        except (urllib.error.URLError, OSError):
            return False
        return True

    def create_vhost(self, name: str) -> None:
        if self.api_available():
            self._api("PUT", f"/api/vhosts/{quote(name, safe='')}")
            self._api(
                "PUT",
                f"/api/permissions/{quote(name, safe='')}/{quote(self.user, safe='')}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )
            return
        ctl = self.ctl()
        if ctl is None:
            raise BrokerUnavailable(
                f"cannot create a test vhost: management API at {self.management_url} is not "
                "reachable (run `rabbitmq-plugins enable rabbitmq_management`) and rabbitmqctl "
                "is not installed"
            )
        subprocess.run([*ctl, "add_vhost", name], check=True, capture_output=True)
        subprocess.run(
            [*ctl, "set_permissions", "-p", name, self.user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )

    def delete_vhost(self, name: str) -> None:
        if self.api_available():
            self._api("DELETE", f"/api/vhosts/{quote(name, safe='')}")
        elif ctl := self.ctl():
            subprocess.run([*ctl, "delete_vhost", name], check=False, capture_output=True)

    def close_connections(self, client_name: str) -> int:
        """Force-close (as an operator or a network fault would) every connection whose
        client-provided name is ``client_name``; returns how many. Needs the management API."""
        if not self.api_available():
            raise BrokerUnavailable(
                f"cannot close connections: management API at {self.management_url} is not "
                "reachable (run `rabbitmq-plugins enable rabbitmq_management`)"
            )
        closed = 0
        for connection in management_json(self, "/api/connections"):
            if connection.get("client_properties", {}).get("connection_name") == client_name:
                self._api("DELETE", f"/api/connections/{quote(connection['name'], safe='')}")
                closed += 1
        return closed

    def new_vhost(self) -> str:
        name = f"bangui-geo-test-{uuid.uuid4().hex[:12]}"
        self.create_vhost(name)
        return name


def _from_url(
    url: str, management_url: str | None, ctl_prefix: tuple[str, ...] = ()
) -> BrokerAdmin:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return BrokerAdmin(
        amqp_url=urlunsplit((parts.scheme, parts.netloc, "/", "", "")),
        management_url=management_url or f"http://{host}:15672",
        user=parts.username or "guest",
        password=parts.password or "guest",
        ctl_prefix=ctl_prefix,
    )


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _local_engine() -> bool:
    """The engine runs on this machine: its published ports are on this machine's loopback."""
    docker_host = os.environ.get("DOCKER_HOST", "")
    return docker_host == "" or docker_host.startswith("unix://")


def _container_host(reported: str, port: int) -> str:
    """Where to reach a published port. testcontainers takes a machine with ``/.dockerenv`` for
    a container and hands out the bridge gateway; on a machine that only looks like one (the
    engine's ports are on this loopback), 127.0.0.1 is the address. A connection mode the user
    chose (``TESTCONTAINERS_CONNECTION_MODE``) is testcontainers' own answer and wins."""
    if os.environ.get("TESTCONTAINERS_CONNECTION_MODE"):
        return reported
    loopback = ("localhost", "127.0.0.1")
    if reported not in loopback and _local_engine() and _answers("127.0.0.1", port):
        return "127.0.0.1"
    return reported


def docker_engine_running() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "info"], capture_output=True, check=False, timeout=20)
    return probe.returncode == 0


def start_broker(env_url: str | None, management_url: str | None, stack: ExitStack) -> BrokerAdmin:
    """Return the broker to test against, or raise ``BrokerUnavailable`` saying why."""
    if env_url:
        return _from_url(env_url, management_url)
    if not docker_engine_running():
        raise BrokerUnavailable(
            "no RabbitMQ for the integration tests: set GEO_TEST_AMQP_URL "
            "(e.g. amqp://guest:guest@127.0.0.1:5672/) or run where a Docker engine answers "
            "so testcontainers can start rabbitmq:3-management"
        )
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ModuleNotFoundError as exc:  # pika comes with the extra: testcontainers[rabbitmq]
        raise BrokerUnavailable(
            f"testcontainers' RabbitMQ module does not import ({exc}): install the test extra "
            "(pip install -e '.[test]', which has testcontainers[rabbitmq])"
        ) from exc

    container: AbstractContextManager[RabbitMqContainer] = RabbitMqContainer(
        "rabbitmq:3-management"
    ).with_exposed_ports(5672, 15672)
    try:
        running = stack.enter_context(container)
    except Exception as exc:
        ryuk = (
            ""
            if os.environ.get("TESTCONTAINERS_RYUK_DISABLED")
            else (
                "; where no registry answers, Ryuk (testcontainers/ryuk) cannot be pulled either: "
                "set TESTCONTAINERS_RYUK_DISABLED=true"
            )
        )
        raise BrokerUnavailable(
            f"testcontainers could not start rabbitmq:3-management: {exc}{ryuk}"
        ) from exc
    amqp_port = int(running.get_exposed_port(5672))
    mgmt_port = int(running.get_exposed_port(15672))
    host = _container_host(running.get_container_host_ip(), amqp_port)
    container_id = running.get_wrapped_container().id
    return _from_url(
        f"amqp://guest:guest@{host}:{amqp_port}/",
        f"http://{host}:{mgmt_port}",
        ctl_prefix=("docker", "exec", container_id),
    )


def management_json(admin: BrokerAdmin, path: str) -> Any:
    """GET ``path`` of the management API (e.g. ``/api/queues/<vhost>/<queue>``), decoded."""
    request = urllib.request.Request(admin.management_url + path)
    token = base64.b64encode(f"{admin.user}:{admin.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
