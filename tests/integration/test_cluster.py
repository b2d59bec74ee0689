"""A three-node RabbitMQ cluster on this machine, quorum queues, and the services connected to
the list of the nodes' URLs: stopping the node they are connected to loses nothing, and they
carry on through the other two. Tools given such a list try each URL once.

The nodes are extra RabbitMQ nodes of the installed broker (``geo-a``, ``geo-b``, ``geo-c`` on
AMQP ports 5681-5683), with their data, logs, config and Erlang cookie in a temporary directory.
The system broker on 5672 is never touched: its cookie differs from the test nodes' cookie, so
the test's ``rabbitmqctl`` calls cannot reach it even by mistake.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bangui_geo.testing import (
    DURABLE_QUEUES,
    ServiceGroup,
    async_poll,
    drain_queue,
    events,
    public_ips,
    publish,
    read_rows,
    wait_for_topology,
)
from bangui_geo.testing.expected import expected_row
from bangui_geo.testing.services import logged
from shared.amqp import BrokerUnreachable, connect_once
from tests.integration.rabbit_nodes import Node, prepare_home

pytestmark = pytest.mark.integration

COOKIE = "BANGUIGEOCLUSTERTESTCOOKIE"
NODES = (("geo-a", 5681), ("geo-b", 5682), ("geo-c", 5683))


@dataclass
class LocalCluster:
    home: Path
    nodes: list[Node] = field(default_factory=list)

    def start(self) -> None:
        prepare_home(self.home, COOKIE)
        self.nodes = [Node(name, port, self.home) for name, port in NODES]
        for node in self.nodes:
            node.assert_not_running()
            node.start()
        for node in self.nodes:
            node.wait_started()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
        status = json.loads(first.ctl("cluster_status", "--formatter", "json"))
        assert sorted(status["running_nodes"]) == sorted(n.nodename for n in self.nodes)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def node_at(self, endpoint: str) -> Node:
        (node,) = [n for n in self.nodes if n.endpoint == endpoint]
        return node

    def queues(self, via: Node) -> dict[str, dict[str, Any]]:
        listed = via.ctl("list_queues", "name", "type", "leader", "members", "--formatter", "json")
        return {q["name"]: q for q in json.loads(listed)}


async def paced_publish(url: str, bodies: list[Any], chunk: int = 100) -> None:
    """Publish in confirmed chunks with a pause between them: a stream lasting a few seconds."""
    for start in range(0, len(bodies), chunk):
        await publish(url, "ip.seen", bodies[start : start + chunk])
        await asyncio.sleep(0.05)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    group = LocalCluster(tmp_path_factory.mktemp("rabbit"))
    try:
        group.start()
        yield group
    finally:
        group.stop()


async def test_stopping_the_node_the_services_use_loses_nothing(
    cluster: LocalCluster, service_group: ServiceGroup
) -> None:
    started = time.monotonic()
    a, b, c = cluster.nodes
    # The same list of URLs for every service.
    service_group.amqp_url = ",".join(node.url for node in cluster.nodes)
    service_group.env.update(GEO_QUEUE_TYPE="quorum", GEO_FLUSH_INTERVAL="0.5")
    db_path = service_group.db_path
    envs = {"timer": {"GEO_LOG_LEVEL": "debug"}}  # each tick is logged at debug
    services = {
        name: service_group.start(name, **envs.get(name, {}))
        for name in ("persistence", "resolver", "timer")
    }
    await wait_for_topology(b.url)
    await logged(services["persistence"], "persistence_ready", "persistence ready", 20)
    await logged(services["resolver"], "resolver_ready", "resolver ready", 20)
    await logged(services["timer"], "timer_leading", "timer leading", 20)
    queues = await asyncio.to_thread(cluster.queues, via=b)
    for name in DURABLE_QUEUES:
        assert queues[name]["type"] == "quorum", name
        assert sorted(queues[name]["members"]) == sorted(n.nodename for n in cluster.nodes)
    resolver = services["resolver"]
    (connected,) = events(resolver, "amqp_connected")
    doomed = cluster.node_at(connected["broker"])
    assert doomed is a, "the list is tried in order: the first node answers"

    ips = public_ips(10_000, seed=7)
    first, second = ips[:7_000], ips[7_000:]
    bodies: list[Any] = [{"ip": ip} for ip in first[:5_000]]
    bodies += [{"ips": first[i : i + 500]} for i in range(5_000, len(first), 500)]
    publisher = asyncio.create_task(paced_publish(c.url, bodies))
    await async_poll(
        lambda: len(read_rows(db_path)) >= 1_000, deadline_s=20, what="first rows written"
    )
    await asyncio.to_thread(doomed.ctl, "stop_app")
    assert not publisher.done(), "the stream ended before the node was stopped"
    await publisher  # its node stays up; its confirms wait for the queues' new leaders
    # The writer must be back on its queues first: a standby registering before it would
    # rightly be handed them (single active consumer), and the check below would not hold.
    await logged(services["persistence"], "amqp_connection_restored", "writer back", 20)

    def writer_consuming() -> bool:
        listed = b.ctl("list_queues", "name", "consumers", "--formatter", "json")
        consumers = {q["name"]: int(q["consumers"] or 0) for q in json.loads(listed)}
        return all(
            consumers.get(name, 0) >= 1
            for name in ("geo.persistence.upsert", "geo.persistence.re_resolve")
        )

    # Restored means connected; its consumers come back a moment later.
    await async_poll(
        lambda: asyncio.to_thread(writer_consuming), deadline_s=20, what="writer consuming"
    )
    # A service started now tries the list in order and connects to the next node.
    standby = service_group.start("persistence", "persistence-2")
    services["persistence-2"] = standby
    await logged(standby, "persistence_ready", "a second persistence ready", 20)
    assert events(standby, "amqp_connected")[0]["broker"] == b.endpoint
    # Everything published before, during and after the stop ends up in geo_cache.
    more = [{"ips": second[i : i + 250]} for i in range(0, len(second), 250)]
    await publish(b.url, "ip.seen", more)
    expected = {ip: expected_row(ip) for ip in ips}

    def complete() -> bool:
        rows = read_rows(db_path)
        return {ip: (r[0], r[1], r[5]) for ip, r in rows.items()} == expected

    await async_poll(complete, deadline_s=45, interval=0.5, what="all 10,000 rows")

    for name in ("persistence", "resolver", "timer"):
        process = services[name]
        assert process.running, f"{name} died with the node"
        restored = events(process, "amqp_connection_restored")
        assert restored, f"{name} did not reconnect"
        assert restored[-1]["broker"] in (b.endpoint, c.endpoint), restored[-1]
    timer_log = [e["event"] for e in services["timer"].log_events()]
    last_restore = len(timer_log) - timer_log[::-1].index("amqp_connection_restored")
    assert "timer_tick_published" in timer_log[last_restore:], "the timer fell silent"
    assert not events(standby, "geo_upserts_applied"), "the standby wrote beside the writer"
    assert await drain_queue(b.url, "geo.dead_letter") == []
    after = await asyncio.to_thread(cluster.queues, via=b)
    for name in DURABLE_QUEUES:
        assert not after[name]["leader"].startswith(f"{a.name}@"), (name, after[name])
    for name, process in services.items():
        assert process.stop() == 0, name
    assert time.monotonic() - started < 90


async def test_a_tool_tries_each_url_of_the_list_once(amqp_url: str) -> None:
    # The CLI and shared.client connect once per URL, in order, and say why each one failed.
    dead = "amqp://guest:s3cret@127.0.0.1:1/"
    connection = await connect_once(f"{dead},{amqp_url}", connect_timeout=5)
    await connection.close()
    with pytest.raises(BrokerUnreachable) as info:
        await connect_once(f"{dead},amqp://guest:s3cret@127.0.0.1:2/", connect_timeout=5)
    message = str(info.value)
    assert "127.0.0.1:1/" in message
    assert "127.0.0.1:2/" in message
    assert "s3cret" not in message
