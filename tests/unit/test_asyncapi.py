"""asyncapi.yaml is generated from the message models and must not go stale."""

from __future__ import annotations

from pathlib import Path

import yaml

from shared import topology
from shared.asyncapi import CHANNELS, document, render

ASYNCAPI = Path(__file__).resolve().parents[2] / "asyncapi.yaml"


def test_checked_in_asyncapi_matches_the_models() -> None:
    assert ASYNCAPI.read_text() == render(), (
        "asyncapi.yaml is stale: run `python -m shared.asyncapi > asyncapi.yaml` and review it"
    )


def test_every_routing_key_has_a_channel_with_its_model_schema() -> None:
    keys = {
        topology.IP_SEEN,
        topology.FLUSH,
        topology.RE_RESOLVE,
        topology.UPSERT,
        topology.RETRY,
        topology.RESOLVED,
    }
    doc = yaml.safe_load(ASYNCAPI.read_text())
    assert set(doc["channels"]) == keys
    for channel in CHANNELS:
        ref = doc["channels"][channel.routing_key]["subscribe"]["message"]["payload"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert name == channel.model.__name__
        assert doc["components"]["schemas"][name]["title"] == name
    assert doc == document()
