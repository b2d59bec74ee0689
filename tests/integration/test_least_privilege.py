"""deploy/rabbitmq/definitions.json on a real broker: each service runs with its own user, and no
user can do more than its part.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from tests.broker import BrokerAdmin
from tests.integration.support import (
    REPO_ROOT,
    ServiceProcess,
    async_poll,
    publish,
    read_rows,
    service_env,
)

pytestmark = pytest.mark.integration

DEFINITIONS = REPO_ROOT / "deploy" / "rabbitmq" / "definitions.json"
SERVICES = {"resolver": "geo-resolver", "timer": "geo-timer", "persistence": "geo-persistence"}
PUBLISHER = "bangui-publisher"
ADMIN = "bangui-admin"
READY_EVENT = {
    "resolver": "resolver_ready",
    "timer": "timer_leading",
    "persistence": "persistence_ready",
}
KEYS = ("ip.seen", "geo.flush", "geo.re_resolve", "geo.upsert", "geo.retry", "ip.resolved")


def dev_password(user: str) -> str:
    """The development-only password of a user in definitions.json (deploy/README.md)."""
    return f"dev-only-{user}"


@dataclass(frozen=True)
class Deployment:
    """definitions.json imported under a unique vhost and unique user names."""

    admin: BrokerAdmin
    vhost: str
    users: dict[str, str]  # name in the file -> name on the broker

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
        for item in out[kind]:
            item["vhost"] = vhost
            if "user" in item:
                item["user"] = users[item["user"]]
    return out


@pytest.fixture
def deployment(broker_admin: BrokerAdmin) -> Iterator[Deployment]:
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


async def test_each_service_runs_the_pipeline_with_its_own_user(
    deployment: Deployment, tmp_path: Path
) -> None:
    db_path = tmp_path / "geo_cache.sqlite3"
    processes = {
        name: ServiceProcess(
            name, service_env(deployment.url(user), db_path), tmp_path / f"{name}.log"
        ).start()
        for name, user in SERVICES.items()
    }
    try:
        for name, process in processes.items():

            def ready(name: str = name, process: ServiceProcess = process) -> bool:
                assert process.running, f"{name} exited:\n{process.log_path.read_text()[-3000:]}"
                return any(e.get("event") == READY_EVENT[name] for e in process.log_events())

            await async_poll(ready, deadline_s=30, what=f"{name} ready")

        # The publisher user feeds the pipeline: resolver -> (timer's geo.flush) -> persistence.
        ips = ["8.8.8.8", "1.1.1.1", "192.168.7.7"]
        await publish(deployment.url(PUBLISHER), "ip.seen", [{"ips": ips}])
        await async_poll(
            lambda: set(ips) <= set(read_rows(db_path)), deadline_s=30, what="rows in geo_cache"
        )
        for name, process in processes.items():
            assert process.running, f"{name} stopped:\n{process.log_path.read_text()[-3000:]}"
    finally:
        codes: dict[str, int | str] = {}
        for name, process in processes.items():  # stop them all, even if one hangs
            try:
                codes[name] = process.stop()
            except AssertionError as exc:
                codes[name] = str(exc)
    assert codes == dict.fromkeys(processes, 0)  # each shut down cleanly, final flush included
    for name, process in processes.items():
        text = process.log_path.read_text()
        assert "ACCESS_REFUSED" not in text, f"{name} was refused something:\n{text[-3000:]}"
        errors = [e for e in process.log_events() if e.get("level") in ("error", "critical")]
        assert errors == [], name


async def test_each_user_publishes_only_its_own_routing_keys(deployment: Deployment) -> None:
    may_publish = {
        PUBLISHER: {"ip.seen"},
        "geo-resolver": {"geo.upsert", "ip.resolved"},
        "geo-timer": {"geo.flush", "geo.re_resolve"},
        "geo-persistence": {"geo.retry"},
    }
    results: dict[tuple[str, str], str] = {}
    expected: dict[tuple[str, str], str] = {}
    for user, allowed in may_publish.items():
        connection = await aio_pika.connect_robust(deployment.url(user))
        try:
            for key in KEYS:
                results[(user, key)] = await outcome(connection, publishing("bangui", key))
                expected[(user, key)] = "ok" if key in allowed else "refused"
        finally:
            await connection.close()
    assert results == expected


async def test_dead_letter_exchange_takes_only_each_consumers_own_rejects(
    deployment: Deployment,
) -> None:
    # A service republishes a reject to bangui.dlx with the routing key it arrived with; nothing
    # else may be written there (geo.dead_letter is bound with '#', and dead letters get replayed).
    cases = {
        ("geo-resolver", "ip.seen"): "ok",
        ("geo-resolver", "geo.retry"): "ok",
        ("geo-resolver", "geo.upsert"): "refused",
        ("geo-persistence", "geo.upsert"): "ok",
        ("geo-persistence", "ip.seen"): "refused",
        ("geo-timer", "geo.flush"): "refused",
        ("geo-timer", ""): "refused",
        (PUBLISHER, "ip.seen"): "refused",
    }
    results = {}
    for user, key in cases:
        connection = await aio_pika.connect_robust(deployment.url(user))
        try:
            results[(user, key)] = await outcome(connection, publishing("bangui.dlx", key))
        finally:
            await connection.close()
    assert results == cases


async def test_publisher_cannot_consume_declare_or_bind(deployment: Deployment) -> None:
    connection = await aio_pika.connect_robust(deployment.url(PUBLISHER))
    try:
        attempts = {
            "consume geo.persistence.upsert": consuming("geo.persistence.upsert"),
            "consume geo.resolver.ip_seen": consuming("geo.resolver.ip_seen"),
            "consume geo.dead_letter": consuming("geo.dead_letter"),
            "declare a queue": declaring("bangui.publisher.tap", exclusive=True),
            "redeclare the topology": declaring(
                "geo.resolver.ip_seen",
                durable=True,
                arguments={"x-dead-letter-exchange": "bangui.dlx"},
            ),
            "bind geo.persistence.upsert to ip.seen": binding(
                "geo.persistence.upsert", "bangui", "ip.seen"
            ),
        }
        results = {what: await outcome(connection, action) for what, action in attempts.items()}
    finally:
        await connection.close()
    assert results == dict.fromkeys(attempts, "refused")


async def test_services_cannot_take_each_others_work_or_eavesdrop(
    deployment: Deployment,
) -> None:
    flush_queue = "geo.resolver.flush.lp-test.1"
    cases: list[tuple[str, str, Callable[[AbstractChannel], Any], str]] = [
        # Each consumes its own queues...
        ("geo-resolver", "consume geo.resolver.retry", consuming("geo.resolver.retry"), "ok"),
        ("geo-persistence", "consume re_resolve", consuming("geo.persistence.re_resolve"), "ok"),
        # ...and not another service's work, nor the dead letters.
        ("geo-timer", "consume upsert", consuming("geo.persistence.upsert"), "refused"),
        ("geo-timer", "consume ip_seen", consuming("geo.resolver.ip_seen"), "refused"),
        ("geo-resolver", "consume upsert", consuming("geo.persistence.upsert"), "refused"),
        ("geo-persistence", "consume ip_seen", consuming("geo.resolver.ip_seen"), "refused"),
        ("geo-persistence", "consume retry", consuming("geo.resolver.retry"), "refused"),
        ("geo-resolver", "consume re_resolve", consuming("geo.persistence.re_resolve"), "refused"),
        ("geo-timer", "consume re_resolve", consuming("geo.persistence.re_resolve"), "refused"),
        ("geo-resolver", "consume dead letters", consuming("geo.dead_letter"), "refused"),
        ("geo-persistence", "consume dead letters", consuming("geo.dead_letter"), "refused"),
        ("geo-timer", "consume dead letters", consuming("geo.dead_letter"), "refused"),
        # Only the timer may take the timer's leader lock.
        (
            "geo-resolver",
            "declare geo.timer.leader",
            declaring("geo.timer.leader", exclusive=True),
            "refused",
        ),
        (
            "geo-persistence",
            "declare geo.timer.leader",
            declaring("geo.timer.leader", exclusive=True),
            "refused",
        ),
        (
            "geo-timer",
            "declare geo.timer.leader",
            declaring("geo.timer.leader", exclusive=True),
            "ok",
        ),
        # Only a resolver declares per-replica flush queues, and binds them to geo.flush only.
        (
            "geo-timer",
            "declare a resolver flush queue",
            declaring(flush_queue, exclusive=True),
            "refused",
        ),
        (
            "geo-resolver",
            "declare a resolver flush queue",
            declaring(flush_queue, durable=True),
            "ok",
        ),
        ("geo-resolver", "bind it to geo.flush", binding(flush_queue, "bangui", "geo.flush"), "ok"),
        ("geo-resolver", "bind it to '#'", binding(flush_queue, "bangui", "#"), "refused"),
        ("geo-resolver", "bind it to ip.*", binding(flush_queue, "bangui", "ip.*"), "refused"),
        # No service may bind a queue to bangui with a pattern that copies every message.
        (
            "geo-persistence",
            "bind upsert to '#'",
            binding("geo.persistence.upsert", "bangui", "#"),
            "refused",
        ),
        (
            "geo-timer",
            "bind ip_seen to '#'",
            binding("geo.resolver.ip_seen", "bangui", "#"),
            "refused",
        ),
    ]
    results = {}
    for user, what, action, _ in cases:
        connection = await aio_pika.connect_robust(deployment.url(user))
        try:
            results[(user, what)] = await outcome(connection, action)
        finally:
            await connection.close()
    assert results == {(user, what): expected for user, what, _, expected in cases}


def test_admin_user_reaches_the_management_ui(deployment: Deployment) -> None:
    admin = deployment.users[ADMIN]
    whoami = management(deployment.admin, "GET", "/api/whoami", auth=(admin, dev_password(ADMIN)))
    assert whoami["name"] == admin
    tags = whoami["tags"] if isinstance(whoami["tags"], list) else whoami["tags"].split(",")
    assert "administrator" in tags
    with pytest.raises(AssertionError, match="HTTP 401"):
        management(
            deployment.admin,
            "GET",
            "/api/whoami",
            auth=(deployment.users[PUBLISHER], dev_password(PUBLISHER)),
        )
