"""The broker bounds what a publisher can make us hold: a RabbitMQ node booted with the shipped
rabbitmq.conf and definitions.json refuses a body over its ``max_message_size``, and the shipped
policy bounds ``geo.dead_letter`` (oldest dropped first), on a classic queue and on the cluster
variant's quorum queue alike, without the services' declarations changing.

The node is private to this module (its own name, port, data and cookie: ``rabbit_nodes``); it
boots from the files as shipped, with only the definitions path and a listener port filled in.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from bangui_geo.testing import REPO_ROOT
from shared import topology
from shared.amqp import declare_topology
from shared.settings import Settings
from tests.integration.rabbit_nodes import Node, prepare_home

pytestmark = pytest.mark.integration

DEPLOY = REPO_ROOT / "deploy" / "rabbitmq"
NODE_NAME = "geo-limits"
NODE_PORT = 5693
COOKIE = "bangui-geo-limits-test-cookie"
POLICY = "geo-dead-letter-bound"
SMALL_BOUND = 20  # the policy scaled down to a count a test can overfill


def shipped_max_message_size() -> int:
    found = re.search(
        r"^max_message_size\s*=\s*(\d+)\s*$", (DEPLOY / "rabbitmq.conf").read_text(), re.M
    )
    assert found, "rabbitmq.conf sets max_message_size"
    return int(found.group(1))


def node_config(definitions: Path) -> str:
    """The shipped rabbitmq.conf with the definitions path of this machine, plus a listener."""
    shipped = (DEPLOY / "rabbitmq.conf").read_text()
    config = re.sub(
        r"^load_definitions\s*=.*$", f"load_definitions = {definitions}", shipped, flags=re.M
    )
    assert str(definitions) in config
    return f"listeners.tcp.1 = 127.0.0.1:{NODE_PORT}\n{config}"


def in_vhost(definitions: dict[str, Any], vhost: str, bound: int) -> dict[str, Any]:
    """``definitions`` moved to ``vhost`` with the policy's limits scaled down to ``bound``
    messages (pattern, target and overflow as shipped); the users stay as they are."""
    out = json.loads(json.dumps(definitions))
    out["vhosts"] = [{**v, "name": vhost} for v in out["vhosts"]]
    kinds = ("permissions", "topic_permissions", "parameters", "policies", "exchanges")
    for kind in (*kinds, "queues", "bindings"):
        for item in out.get(kind, []):
            item["vhost"] = vhost
    for policy in out["policies"]:
        if policy["name"] == POLICY:
            policy["definition"]["max-length"] = bound
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Boots from a definitions directory: the shipped file as is, then the scaled-down copies
    (RabbitMQ imports every file of a directory at boot, in name order)."""
    home = tmp_path_factory.mktemp("rabbit-limits")
    prepare_home(home, COOKIE)
    definitions = home / "definitions"
    definitions.mkdir()
    (definitions / "1-bangui.json").write_text((DEPLOY / "definitions.json").read_text())
    for name, source, vhost in (
        ("2-small.json", DEPLOY / "definitions.json", "bangui-small"),
        ("3-quorum.json", DEPLOY / "cluster" / "definitions.json", "bangui-quorum"),
    ):
        moved = in_vhost(json.loads(source.read_text()), vhost, SMALL_BOUND)
        (definitions / name).write_text(json.dumps(moved))
    limits = Node(NODE_NAME, NODE_PORT, home, config=node_config(definitions))
    limits.assert_not_running()
    try:
        limits.start()
        limits.wait_started()
        yield limits
    finally:
        limits.stop()


def url(user: str, vhost: str) -> str:
    """A user of definitions.json with its development password (deploy/README.md)."""
    return f"amqp://{user}:dev-only-{user}@127.0.0.1:{NODE_PORT}/{quote(vhost, safe='')}"


@pytest.fixture
async def publisher(node: Node) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(url("bangui-publisher", "bangui"), timeout=30)
    yield connection
    await connection.close()


async def messages_in(vhost: str, name: str) -> int:
    """Messages ready in a queue (a passive declare over AMQP: quicker than rabbitmqctl)."""
    connection = await aio_pika.connect(url("bangui-admin", vhost), timeout=30)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_the_broker_refuses_a_body_over_its_limit_and_takes_one_under_it(
    node: Node, publisher: aio_pika.abc.AbstractConnection
) -> None:
    limit = shipped_max_message_size()
    service_limit = Settings().max_message_bytes
    assert limit > service_limit  # bodies between the two reach the service and are dead-lettered
    before = await messages_in("bangui", topology.RESOLVER_IP_SEEN.name)

    channel = await publisher.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(topology.EXCHANGE, ensure=False)
    await exchange.publish(aio_pika.Message(b"x" * (service_limit + 1)), topology.IP_SEEN)
    with pytest.raises(ChannelPreconditionFailed, match="larger than configured max size"):
        await exchange.publish(aio_pika.Message(b"x" * (limit + 1)), topology.IP_SEEN)
    assert channel.is_closed

    after = await messages_in("bangui", topology.RESOLVER_IP_SEEN.name)
    assert after == before + 1, "only the body under the broker's limit was queued"


async def test_the_shipped_policy_is_loaded_at_boot_as_shipped(node: Node) -> None:
    shipped = json.loads((DEPLOY / "definitions.json").read_text())
    (policy,) = [p for p in shipped["policies"] if p["name"] == POLICY]
    listing = json.loads(
        node.ctl("list_policies", "-p", "bangui", "--formatter", "json", timeout=300)
    )
    (loaded,) = [p for p in listing if p["name"] == POLICY]
    definition = loaded["definition"]
    assert (json.loads(definition) if isinstance(definition, str) else definition) == policy[
        "definition"
    ]
    assert (loaded["pattern"], loaded["apply-to"]) == (policy["pattern"], policy["apply-to"])


@pytest.mark.parametrize(
    ("vhost", "queue_type"), [("bangui-small", "classic"), ("bangui-quorum", "quorum")]
)
async def test_the_policy_bounds_the_dead_letter_queue_dropping_the_oldest(
    node: Node, vhost: str, queue_type: str
) -> None:
    connection = await aio_pika.connect(url("bangui-admin", vhost), timeout=30)
    try:
        channel = await connection.channel(publisher_confirms=True)
        # The services' own declaration still matches the queue the definitions made: a policy
        # changes no queue argument, so an existing deployment needs no redeclare.
        await declare_topology(channel, "quorum" if queue_type == "quorum" else "classic")
        dlx = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE, ensure=False)
        for n in range(SMALL_BOUND + 15):
            await dlx.publish(aio_pika.Message(f'{{"n": {n}}}'.encode()), topology.IP_SEEN)
        queue = await channel.declare_queue(topology.DEAD_LETTER.name, passive=True)
        assert queue.declaration_result.message_count == SMALL_BOUND
        first = await queue.get(no_ack=True, timeout=10)
        assert first is not None
        assert json.loads(first.body) == {"n": 15}, "the oldest 15 were dropped"
    finally:
        await connection.close()
