"""docker-compose.yml end to end, as the README's "Run with docker compose" runs it: the four
containers healthy, the users limited as deploy/rabbitmq/definitions.json says, 5,000 IPs
published from a container while each service container is killed and the broker restarts, every
row in the persistence volume, and `down -v` leaving nothing behind."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.container.conftest import FIGURES
from tests.container.stack import (
    ADMIN_PASSWORD,
    PUBLISHER_PASSWORD,
    REPO,
    Stack,
    docker,
    public_ips,
    wait_for,
)
from tests.integration.deployment import consuming, outcome, publishing

DEFINITIONS = json.loads((REPO / "deploy" / "rabbitmq" / "definitions.json").read_text())
IPS = 5_000
CHUNKS = 5
# After which chunk of the stream each fault happens: each with IPs before and after it.
FAULTS = {0: "resolver", 1: "timer", 2: "persistence", 3: "rabbitmq"}
PUBLISHER_URL = f"amqp://bangui-publisher:{PUBLISHER_PASSWORD}@rabbitmq:5672/bangui"


@pytest.fixture(scope="module")
def stack(lane_env_file: Path) -> Iterator[Stack]:
    stack = Stack(project="bangui-geo-lane", env_file=lane_env_file)
    stack.compose("down", "-v", "--remove-orphans", check=False)
    try:
        # The README's command.
        stack.compose("up", "--build", "--wait", timeout=600)
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)


def host_url(stack: Stack, user: str, password: str) -> str:
    return f"amqp://{user}:{password}@127.0.0.1:{stack.port('RABBITMQ_AMQP_PORT')}/bangui"


def management(stack: Stack, path: str) -> Any:
    port = stack.port("RABBITMQ_MANAGEMENT_PORT")
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    token = base64.b64encode(f"bangui-admin:{ADMIN_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_up_wait_leaves_every_container_healthy(stack: Stack) -> None:
    for service in ("rabbitmq", "resolver", "timer", "persistence"):
        state = stack.state(service)
        assert state["Running"], service
        health = state.get("Health")
        assert isinstance(health, dict), f"{service} has no healthcheck"
        assert health["Status"] == "healthy", service
    images = {
        docker("inspect", "-f", "{{.Image}}", stack.container(service))
        for service in ("resolver", "timer", "persistence")
    }
    assert len(images) == 1, f"the three services run {len(images)} images, not one"


async def test_guest_is_refused(stack: Stack) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{stack.port('RABBITMQ_AMQP_PORT')}/"
    with pytest.raises(Exception) as refused:  # noqa: PT011 - aiormq's error types vary by version
        await aio_pika.connect(url, timeout=10)
    assert (
        "ACCESS_REFUSED" in repr(refused.value) or "Authentication" in type(refused.value).__name__
    ), repr(refused.value)


def test_broker_grants_exactly_the_definitions_permissions(stack: Stack) -> None:
    def keyed(entries: list[dict[str, Any]], fields: tuple[str, ...]) -> set[tuple[str, ...]]:
        return {tuple(str(entry[f]) for f in fields) for entry in entries}

    permission = ("user", "vhost", "configure", "write", "read")
    topic = ("user", "vhost", "exchange", "write", "read")
    assert keyed(management(stack, "/api/permissions"), permission) == keyed(
        DEFINITIONS["permissions"], permission
    )
    assert keyed(management(stack, "/api/topic-permissions"), topic) == keyed(
        DEFINITIONS["topic_permissions"], topic
    )
    users = {user["name"] for user in management(stack, "/api/users")}
    assert users == {user["name"] for user in DEFINITIONS["users"]}, "guest or another user exists"


async def test_each_user_is_refused_what_the_definitions_deny(stack: Stack) -> None:
    # Only refusals are tried on the running pipeline: nothing reaches its queues.
    refused = {
        "bangui-publisher": [publishing("bangui", "geo.upsert"), consuming("geo.resolver.ip_seen")],
        "geo-resolver": [consuming("geo.persistence.upsert"), publishing("bangui", "ip.seen")],
        "geo-timer": [consuming("geo.resolver.ip_seen"), publishing("bangui", "geo.upsert")],
        "geo-persistence": [consuming("geo.resolver.ip_seen"), publishing("bangui", "geo.flush")],
    }
    results = {}
    for user, actions in refused.items():
        password = PUBLISHER_PASSWORD if user == "bangui-publisher" else f"dev-only-{user}"
        connection = await aio_pika.connect_robust(host_url(stack, user, password), timeout=10)
        try:
            results[user] = [await outcome(connection, action) for action in actions]
        finally:
            await connection.close()
    assert results == {user: ["refused"] * len(actions) for user, actions in refused.items()}


def test_stream_loses_nothing_while_each_container_is_killed(stack: Stack) -> None:
    ips = public_ips(IPS, seed=5000)
    size = IPS // CHUNKS
    killed: list[str] = []
    for index in range(CHUNKS):
        stack.publish(ips[index * size : (index + 1) * size], [PUBLISHER_URL])
        service = FAULTS.get(index)
        if service == "rabbitmq":
            stack.compose("restart", "rabbitmq", timeout=120)
            stack.wait_healthy("rabbitmq")
            killed.append("rabbitmq (restart)")
        elif service is not None:
            before = stack.restart_count(service)
            stack.crash(service)
            wait_for(
                lambda service=service, before=before: stack.restart_count(service) > before,
                60,
                f"the restart policy to bring {service} back",
                on_timeout=stack.unhealthy_logs,
            )
            killed.append(service)
    rows: list[int] = [0]

    def all_rows() -> bool:
        rows[0] = stack.rows(fresh=False)
        return rows[0] >= IPS

    def why() -> str:
        queues = {q["name"]: q.get("messages") for q in management(stack, "/api/queues/bangui")}
        return f"rows {rows[0]} of {IPS}; queue depths {queues}\n{stack.unhealthy_logs()}"

    wait_for(all_rows, 120, f"{IPS} rows in geo_cache", on_timeout=why)
    for service in ("resolver", "timer", "persistence"):
        stack.wait_healthy(service)
    rows[0] = stack.rows()  # in a new container of the image, from the volume
    FIGURES["compose"] = {
        "IPs published": IPS,
        "rows": rows[0],
        "containers killed": len([k for k in killed if "restart" not in k]),
        "broker restarts": len([k for k in killed if "restart" in k]),
        "lost": IPS - rows[0],
    }
    assert rows[0] == IPS, f"lost {IPS - rows[0]} of {IPS}"


def test_down_v_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", timeout=120)
    assert stack.leftovers() == {"container": [], "volume": [], "network": []}
