"""deploy/rabbitmq/definitions.json on a real broker: each service runs with its own user, and no
user can do more than its part (the vhost is loaded as the broker loads it at boot)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceGroup,
    ServiceProcess,
    async_poll,
    drain_queue,
    publish,
    read_rows,
    service_env,
)
from bangui_geo.testing.agent import AgentProcess
from tests.integration.agent_support import Fail2banServer
from tests.integration.deployment import (
    ADMIN,
    PUBLISHER,
    READY_EVENT,
    SERVICES,
    Deployment,
    binding,
    consuming,
    declaring,
    dev_password,
    management,
    outcome,
    publishing,
)

pytestmark = pytest.mark.integration

KEYS = (
    "ip.seen",
    "geo.flush",
    "geo.re_resolve",
    "geo.upsert",
    "geo.retry",
    "ip.resolved",
    "geo.lookup",
    "geo.known",
)


async def test_each_service_runs_the_pipeline_with_its_own_user(
    deployment: Deployment, service_group: ServiceGroup
) -> None:
    db_path = service_group.db_path
    processes = {
        name: service_group.start(name, amqp_url=deployment.url(user))
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
        PUBLISHER: {"ip.seen", "geo.lookup"},
        "geo-resolver": {"geo.upsert", "ip.resolved", "geo.known"},
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
    # A service republishes a reject to bangui.dlx under the routing key its queue is for; nothing
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


async def test_the_agent_runs_as_the_publisher_user(deployment: Deployment, tmp_path: Path) -> None:
    """``bangui-geo agent`` needs no more than the publish-only user the compose profile gives
    it: write on ``bangui``, routing key ``ip.seen``."""
    fail2ban = Fail2banServer(tmp_path / "f2b")
    env = service_env(deployment.url(PUBLISHER), tmp_path / "unused.sqlite3")
    flags = ["--fail2ban-db", str(fail2ban.database), "--state", str(tmp_path / "agent.json")]
    agent = AgentProcess(env, tmp_path / "agent.log", flags)
    ips = ["8.8.4.4", "9.9.9.9"]
    try:
        await asyncio.to_thread(fail2ban.start)
        await fail2ban.ban_async(ips)
        agent.start()
        seen: list[str] = []

        async def delivered() -> bool:
            for message in await drain_queue(deployment.url(ADMIN), "geo.resolver.ip_seen"):
                seen.extend(json.loads(message.body)["ips"])
            return set(ips) <= set(seen)

        await async_poll(delivered, deadline_s=30, what="the agent's ip.seen in the queue")
    finally:
        if agent.running:
            assert agent.stop() == 0
        fail2ban.stop()
    text = agent.log_path.read_text()
    assert "ACCESS_REFUSED" not in text
    assert not [e for e in agent.log_events() if e.get("level") in ("error", "critical")]


# --- the README's table of what each user may do ------------------------------------------------

README = REPO_ROOT / "README.md"
TABLE_HEADING = "### Broker users: what each may do"
MANAGEMENT_LOGIN = "log in to the management UI"


def bound(queue_name: str, exchange: str, key: str) -> Callable[[AbstractChannel], Any]:
    """Bind and leave the binding (re-binding a queue's own key is what a service does)."""

    async def action(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(queue_name, ensure=True)
        await queue.bind(await channel.get_exchange(exchange, ensure=False), routing_key=key)

    return action


def taking(queue_name: str) -> Callable[[AbstractChannel], Any]:
    """Declare an exclusive queue, then delete it, so the next user may take it too."""

    async def action(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(queue_name, exclusive=True)
        await queue.delete(if_unused=False, if_empty=False)

    return action


def unbinding(queue_name: str, exchange: str, key: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(queue_name, ensure=True)
        await queue.unbind(await channel.get_exchange(exchange, ensure=False), routing_key=key)

    return action


def purging(queue_name: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue_name, ensure=True)).purge()

    return action


def deleting_queue(name: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        await channel.queue_delete(name)

    return action


def deleting_exchange(name: str) -> Callable[[AbstractChannel], Any]:
    async def action(channel: AbstractChannel) -> None:
        await channel.exchange_delete(name)

    return action


def replying(channel: AbstractChannel) -> Any:
    """Publish on the default exchange, as an answer to a request's reply_to is."""

    async def action(channel: AbstractChannel) -> None:
        message = aio_pika.Message(b"{}", correlation_id="c1")
        await channel.default_exchange.publish(message, routing_key="geo.gone", mandatory=False)

    return action(channel)


def asking(key: str) -> Callable[[AbstractChannel], Any]:
    """Consume direct reply-to and publish a request with it, as GeoClient does."""

    async def action(channel: AbstractChannel) -> None:
        pseudo = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        tag = await pseudo.consume(_ignore, no_ack=True)
        target = await channel.get_exchange("bangui", ensure=False)
        message = aio_pika.Message(b"{}", reply_to="amq.rabbitmq.reply-to", expiration=1)
        await target.publish(message, routing_key=key, mandatory=False)
        await pseudo.cancel(tag)

    return action


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    del message


UPSERT_ARGUMENTS = {"x-dead-letter-exchange": "bangui.dlx", "x-single-active-consumer": True}
# The README's rows, in its order (destructive ones last: the admin really does them).
ACTIONS: dict[str, Callable[[AbstractChannel], Any]] = {
    "publish `ip.seen` on `bangui`": publishing("bangui", "ip.seen"),
    "publish `geo.upsert` on `bangui`": publishing("bangui", "geo.upsert"),
    "publish `ip.resolved` on `bangui`": publishing("bangui", "ip.resolved"),
    "publish `geo.flush` on `bangui`": publishing("bangui", "geo.flush"),
    "publish `geo.re_resolve` on `bangui`": publishing("bangui", "geo.re_resolve"),
    "publish `geo.retry` on `bangui`": publishing("bangui", "geo.retry"),
    "publish `geo.known` on `bangui`": publishing("bangui", "geo.known"),
    "ask `geo.lookup` with direct reply-to": asking("geo.lookup"),
    "publish a reply on the default exchange": replying,
    "publish `ip.seen` on `bangui.dlx`": publishing("bangui.dlx", "ip.seen"),
    "publish `geo.upsert` on `bangui.dlx`": publishing("bangui.dlx", "geo.upsert"),
    "consume `geo.resolver.ip_seen`": consuming("geo.resolver.ip_seen"),
    "consume `geo.persistence.upsert`": consuming("geo.persistence.upsert"),
    "consume `geo.resolver.lookup`": consuming("geo.resolver.lookup"),
    "consume `geo.persistence.known`": consuming("geo.persistence.known"),
    "consume `geo.dead_letter`": consuming("geo.dead_letter"),
    "take the lock `geo.timer.leader`": taking("geo.timer.leader"),
    "declare a queue `geo.resolver.flush.<host>.<pid>`": taking("geo.resolver.flush.table.1"),
    "declare any other queue (`geo.tap`)": taking("geo.tap"),
    "redeclare `geo.persistence.upsert`": declaring(
        "geo.persistence.upsert", durable=True, arguments=UPSERT_ARGUMENTS
    ),
    "bind `geo.resolver.ip_seen` to `ip.seen`": bound("geo.resolver.ip_seen", "bangui", "ip.seen"),
    "bind `geo.persistence.upsert` to `geo.upsert`": bound(
        "geo.persistence.upsert", "bangui", "geo.upsert"
    ),
    "bind `geo.persistence.upsert` to `ip.seen`": binding(
        "geo.persistence.upsert", "bangui", "ip.seen"
    ),
    "bind `geo.resolver.ip_seen` to `#`": binding("geo.resolver.ip_seen", "bangui", "#"),
    "purge `geo.persistence.upsert`": purging("geo.persistence.upsert"),
    "unbind `geo.dead_letter` from `bangui.dlx`": unbinding("geo.dead_letter", "bangui.dlx", "#"),
    "delete the queue `geo.persistence.upsert`": deleting_queue("geo.persistence.upsert"),
    "delete the queue `geo.dead_letter`": deleting_queue("geo.dead_letter"),
    "delete the exchange `bangui`": deleting_exchange("bangui"),
}


def readme_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The users (columns) and, per action (row), "ok" or "refused" for each user."""
    section = README.read_text().split(TABLE_HEADING, 1)[1]
    lines = section.split("\n|", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [[cell.strip() for cell in ("|" + line).strip("|").split("|")] for line in lines]
    users = [cell.strip("`") for cell in rows[0][1:]]
    table = {}
    for action, *cells in rows[2:]:
        assert set(cells) <= {"yes", "no"}, action
        pairs = zip(users, cells, strict=True)
        table[action] = {user: "ok" if cell == "yes" else "refused" for user, cell in pairs}
    return users, table


def test_readme_table_rows_are_the_actions_tried() -> None:
    users, table = readme_table()
    assert users == [*SERVICES.values(), PUBLISHER, ADMIN]
    assert list(table) == [*ACTIONS, MANAGEMENT_LOGIN]


async def test_each_user_can_do_exactly_what_the_readme_table_says(
    deployment: Deployment,
) -> None:
    users, expected = readme_table()
    results: dict[str, dict[str, str]] = {action: {} for action in expected}
    connections = {user: await aio_pika.connect_robust(deployment.url(user)) for user in users}
    try:
        for action, attempt in ACTIONS.items():  # row by row: the admin's deletes come last
            for user in users:
                results[action][user] = await outcome(connections[user], attempt)
    finally:
        for connection in connections.values():
            await connection.close()
    for user in users:
        results[MANAGEMENT_LOGIN][user] = management_login(deployment, user)
    assert results == expected


def management_login(deployment: Deployment, user: str) -> str:
    try:
        management(
            deployment.admin,
            "GET",
            "/api/whoami",
            auth=(deployment.users[user], dev_password(user)),
        )
    except AssertionError as exc:  # management() turns an HTTP error into one
        return "refused" if "HTTP 401" in str(exc) else f"failed: {exc}"
    return "ok"
