"""The `cluster` profile of docker-compose.yml end to end: three broker nodes that form one
cluster, the durable queues quorum queues on all three, 5,000 IPs published while one node's
container is stopped, every row in the volume, and `down -v` leaving nothing behind."""

from __future__ import annotations

import base64
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.container.conftest import FIGURES
from tests.container.stack import (
    ADMIN_PASSWORD,
    PUBLISHER_PASSWORD,
    Stack,
    docker,
    public_ips,
    wait_for,
)

IPS = 5_000
CHUNKS = 4
NODES = ("rabbitmq-a", "rabbitmq-b", "rabbitmq-c")
DURABLE = (
    "geo.resolver.ip_seen",
    "geo.resolver.retry",
    "geo.persistence.upsert",
    "geo.persistence.re_resolve",
    "geo.dead_letter",
)
PUBLISHER_URLS = [
    f"amqp://bangui-publisher:{PUBLISHER_PASSWORD}@{node}:5672/bangui" for node in NODES
]


def rabbitmq_version() -> tuple[int, ...]:
    env = json.loads(
        docker("image", "inspect", "-f", "{{json .Config.Env}}", "rabbitmq:3-management")
    )
    for item in env:
        if item.startswith("RABBITMQ_VERSION="):
            return tuple(int(x) for x in re.findall(r"\d+", item.split("=", 1)[1])[:3])
    pytest.fail("rabbitmq:3-management does not say its version (RABBITMQ_VERSION)")


@pytest.fixture(scope="module")
def cluster(lane_env_file: Path) -> Iterator[Stack]:
    stack = Stack(
        project="bangui-geo-lane-cluster",
        env_file=lane_env_file,
        extra_args=("--env-file", "deploy/rabbitmq/cluster/cluster.env", "--profile", "cluster"),
    )
    old = rabbitmq_version() < (3, 13)
    if old:
        stack.env["RABBITMQ_CLUSTER_RECONCILIATION_CONF"] = (
            "./deploy/rabbitmq/cluster/no-reconciliation.conf"
        )
    stack.compose("down", "-v", "--remove-orphans", check=False)
    try:
        stack.compose("up", "--build", "--wait", timeout=600)
        wait_for(
            lambda: len(running_nodes(stack)) == len(NODES), 120, "the three nodes in one cluster"
        )
        if old:  # what reconciliation does on 3.13: every quorum queue on the three nodes
            for node in NODES:  # whichever node booted first holds the one member already
                stack.compose(
                    "exec",
                    "-T",
                    "rabbitmq-a",
                    "rabbitmq-queues",
                    "grow",
                    f"rabbit@{node}",
                    "all",
                    timeout=120,
                )
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)


def management(stack: Stack, node: str, path: str) -> Any:
    port = stack.port(f"RABBITMQ_{node[-1].upper()}_MANAGEMENT_PORT")
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    token = base64.b64encode(f"bangui-admin:{ADMIN_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def running_nodes(stack: Stack) -> set[str]:
    try:
        nodes = management(stack, "rabbitmq-a", "/api/nodes")
    except OSError:
        return set()
    return {node["name"] for node in nodes if node["running"]}


def test_three_nodes_form_one_cluster_with_quorum_queues_on_each(cluster: Stack) -> None:
    assert running_nodes(cluster) == {f"rabbit@{node}" for node in NODES}

    def replicated() -> bool:
        queues = {q["name"]: q for q in management(cluster, "rabbitmq-b", "/api/queues/bangui")}
        return all(
            queues[name]["type"] == "quorum" and len(queues[name].get("members", [])) == 3
            for name in DURABLE
        )

    wait_for(replicated, 60, "every durable queue a quorum queue with three members")


def test_stream_loses_nothing_while_a_node_is_stopped(cluster: Stack) -> None:
    ips = public_ips(IPS, seed=3)
    size = IPS // CHUNKS
    for index in range(CHUNKS):
        cluster.publish(ips[index * size : (index + 1) * size], PUBLISHER_URLS)
        if index == 1:  # the node the resolver uses first, in the middle of the stream
            cluster.compose("stop", "rabbitmq-a", timeout=120)
    rows = [0]

    def all_rows() -> bool:
        rows[0] = cluster.rows(fresh=False)
        return rows[0] >= IPS

    wait_for(
        all_rows,
        150,
        f"{IPS} rows with rabbitmq-a stopped",
        on_timeout=lambda: f"rows {rows[0]}\n{cluster.unhealthy_logs()}",
    )
    rows[0] = cluster.rows()  # in a new container of the image, from the volume
    FIGURES["cluster"] = {
        "IPs published": IPS,
        "rows": rows[0],
        "nodes stopped": 1,
        "lost": IPS - rows[0],
    }
    assert rows[0] == IPS, f"lost {IPS - rows[0]} of {IPS}"


def test_down_v_leaves_nothing_behind(cluster: Stack) -> None:
    cluster.compose("down", "-v", timeout=180)
    assert cluster.leftovers() == {"container": [], "volume": [], "network": []}
