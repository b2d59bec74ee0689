"""The broker limits as shipped: one body size limit in both rabbitmq.conf files, above the
services' own, and one dead-letter bound in both definitions files, a policy on geo.dead_letter
alone (a policy changes no queue argument, so the services' declarations stay as they are).
tests/integration/test_broker_limits.py boots a broker from these files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared import topology
from shared.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq"
CONFS = (DEPLOY / "rabbitmq.conf", DEPLOY / "cluster" / "rabbitmq.conf")
DEFINITIONS = (DEPLOY / "definitions.json", DEPLOY / "cluster" / "definitions.json")
POLICY = "geo-dead-letter-bound"


def max_message_size(conf: Path) -> int:
    found = re.findall(r"^max_message_size\s*=\s*(\d+)\s*$", conf.read_text(), re.MULTILINE)
    assert len(found) == 1, f"{conf.name} sets max_message_size once"
    return int(found[0])


def bound(path: Path) -> dict[str, Any]:
    policies = [p for p in json.loads(path.read_text())["policies"] if p["name"] == POLICY]
    assert len(policies) == 1, f"{path} has the {POLICY} policy"
    return dict(policies[0])


def test_the_body_size_limit_is_one_value_with_headroom_over_the_services() -> None:
    sizes = {max_message_size(conf) for conf in CONFS}
    assert len(sizes) == 1, f"the two rabbitmq.conf files differ: {sizes}"
    (size,) = sizes
    service_limit = Settings().max_message_bytes
    assert 2 * service_limit <= size <= 8 * service_limit


@pytest.mark.parametrize("path", DEFINITIONS, ids=["single", "cluster"])
def test_the_dead_letter_queue_is_bounded_by_a_policy_dropping_the_oldest(path: Path) -> None:
    policy = bound(path)
    assert policy == bound(DEFINITIONS[0]), "the cluster's bound is the same"
    assert policy["apply-to"] == "queues"  # classic and quorum queues alike
    names = [q.name for q in (*topology.WORK_QUEUES, topology.DEAD_LETTER)]
    matched = [n for n in names if re.search(policy["pattern"], n)]
    assert matched == [topology.DEAD_LETTER.name]
    definition = policy["definition"]
    assert definition["overflow"] == "drop-head"
    assert definition["max-length"] >= 10_000
    assert definition["max-length-bytes"] >= 100 * max_message_size(CONFS[0])


@pytest.mark.parametrize("path", DEFINITIONS, ids=["single", "cluster"])
def test_no_queue_carries_the_bound_as_an_argument(path: Path) -> None:
    """An x-max-length argument would differ from what the services declare and stop them."""
    for queue in json.loads(path.read_text())["queues"]:
        assert not {"x-max-length", "x-max-length-bytes", "x-overflow"} & set(queue["arguments"])
