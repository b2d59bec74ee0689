"""deploy/rabbitmq/definitions.json loaded on the real broker under a unique vhost, and the
small actions the permission tests try with each of its users.

The file is imported as RabbitMQ imports it at boot (POST /api/definitions, the same importer),
with the vhost and the user names given a unique suffix so that runs never collide; users are
global, so they are deleted afterwards with the vhost. The passwords are the development ones
whose hashes the file carries, so a login also proves the hashes.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from bangui_geo.testing import REPO_ROOT
from bangui_geo.testing.broker import BrokerAdmin

DEFINITIONS = REPO_ROOT / "deploy" / "rabbitmq" / "definitions.json"
SERVICES = {"resolver": "geo-resolver", "timer": "geo-timer", "persistence": "geo-persistence"}
PUBLISHER = "bangui-publisher"
ADMIN = "bangui-admin"
READY_EVENT = {
    "resolver": "resolver_ready",
    "timer": "timer_leading",
    "persistence": "persistence_ready",
}


def dev_password(user: str) -> str:
    """The development-only password of a user in definitions.json (deploy/README.md)."""
    return f"dev-only-{user}"


@dataclass(frozen=True)
class Deployment:
    """definitions.json imported under a unique vhost and unique user names."""

    admin: BrokerAdmin
    vhost: str
    users: dict[str, str]  # name in the file -> name on the broker

    def set_topic_permission(self, user: str, exchange: str, write: str, read: str) -> None:
        """Replace one user's topic permission on one exchange (as an operator would)."""
        vhost, name = quote(self.vhost, safe=""), quote(self.users[user], safe="")
        body = {"exchange": exchange, "write": write, "read": read}
        management(self.admin, "PUT", f"/api/topic-permissions/{vhost}/{name}", body)

    def url(self, user: str) -> str:
        parts = urlsplit(self.admin.amqp_url)
        netloc = f"{quote(self.users[user], safe='')}:{quote(dev_password(user), safe='')}@"
        netloc += f"{parts.hostname}:{parts.port or 5672}"
        return urlunsplit((parts.scheme, netloc, "/" + quote(self.vhost, safe=""), "", ""))


def management(
    admin: BrokerAdmin,
    method: str,
    path: str,
    body: object | None = None,
    *,
    auth: tuple[str, str] | None = None,
) -> Any:
    user, password = auth or (admin.user, admin.password)
    request = urllib.request.Request(
        admin.management_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
    )
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
    return json.loads(text) if text else None


def renamed(definitions: dict[str, Any], vhost: str, users: dict[str, str]) -> dict[str, Any]:
    """The same definitions with the vhost and every user name replaced."""
    out = json.loads(json.dumps(definitions))
    out["vhosts"] = [{**v, "name": vhost} for v in out["vhosts"]]
    for user in out["users"]:
        user["name"] = users[user["name"]]
    for kind in ("permissions", "topic_permissions", "policies", "exchanges", "queues", "bindings"):
        for item in out.get(kind, []):
            item["vhost"] = vhost
            if "user" in item:
                item["user"] = users[item["user"]]
    return out


async def outcome(
    connection: AbstractRobustConnection, action: Callable[[AbstractChannel], Awaitable[Any]]
) -> str:
    """Run one operation on a fresh channel: "ok", or "refused" when the broker closed the
    channel with ACCESS_REFUSED (any other error fails the test)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await action(channel)
    except ChannelAccessRefused as exc:
        return "refused" if "ACCESS_REFUSED" in str(exc) else f"refused? {exc}"
    await channel.close()
    return "ok"


def publishing(exchange: str, key: str, body: bytes = b"{}") -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body), routing_key=key, mandatory=False)

    return action


async def _requeue(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.nack(requeue=True)


def consuming(queue_name: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(queue_name, ensure=True)  # passive: needs no permission
        tag = await queue.consume(_requeue)
        await queue.cancel(tag)

    return action


def binding(queue_name: str, exchange: str, key: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(queue_name, ensure=True)
        source = await channel.get_exchange(exchange, ensure=False)
        await queue.bind(source, routing_key=key)
        await queue.unbind(source, routing_key=key)

    return action


def declaring(queue_name: str, **kwargs: Any) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        await channel.declare_queue(queue_name, **kwargs)

    return action


@contextmanager
def loaded_definitions(broker_admin: BrokerAdmin) -> Iterator[Deployment]:
    definitions = json.loads(DEFINITIONS.read_text())
    suffix = uuid.uuid4().hex[:12]
    vhost = f"bangui-lp-{suffix}"
    users = {u["name"]: f"{u['name']}-lp-{suffix}" for u in definitions["users"]}
    assert set(users) == {*SERVICES.values(), PUBLISHER, ADMIN}
    try:
        management(broker_admin, "POST", "/api/definitions", renamed(definitions, vhost, users))
        yield Deployment(broker_admin, vhost, users)
    finally:
        for path in [f"/api/vhosts/{quote(vhost, safe='')}"] + [
            f"/api/users/{quote(name, safe='')}" for name in users.values()
        ]:
            try:
                management(broker_admin, "DELETE", path)
            except AssertionError as exc:
                if "HTTP 404" not in str(exc):
                    raise
