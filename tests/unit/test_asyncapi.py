"""asyncapi.yaml is generated from the message models, is valid AsyncAPI 3.0, and is true from a
component's point of view: its schemas refuse exactly the bodies the services refuse."""

from __future__ import annotations

import ipaddress
import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import topology
from shared.asyncapi import ROUTES, document, render
from shared.decode import decode
from shared.errors import Rejected
from shared.ipnorm import normalize_ip
from shared.ipschema import IP_PATTERN
from tests.hostile_bodies import EDGE_IP_SEEN, EDGE_LOOKUP, HOSTILE_ELSEWHERE, HOSTILE_IP_SEEN

REPO = Path(__file__).resolve().parents[2]
ASYNCAPI = REPO / "asyncapi.yaml"
SPEC_SCHEMA = REPO / "tests" / "data" / "asyncapi-3.0.0.json"
MAX_BYTES = 1_048_576
MODELS = {route.routing_key: route.model for route in ROUTES}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text())
    return loaded


def test_checked_in_asyncapi_matches_the_models(doc: dict[str, Any]) -> None:
    assert ASYNCAPI.read_text() == render(), (
        "asyncapi.yaml is stale: run `python -m shared.asyncapi > asyncapi.yaml` and review it"
    )
    assert doc == document()


def test_it_is_valid_asyncapi_3(doc: dict[str, Any]) -> None:
    schema = json.loads(SPEC_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(doc)] == []
    # The validator does refuse what the specification forbids, so the pass above means something.
    broken = json.loads(json.dumps(doc))
    broken["operations"]["send_ipSeen"]["action"] = "publish"  # AsyncAPI 2 wording
    broken["servers"]["compose"].pop("protocol")
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert len(refs) > 20
    for ref in refs:
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            assert isinstance(target, dict), f"{ref} does not resolve"
            assert part in target, f"{ref} does not resolve"
            target = target[part]


def test_each_route_says_who_sends_and_who_receives(doc: dict[str, Any]) -> None:
    keys = {
        topology.IP_SEEN,
        topology.FLUSH,
        topology.RE_RESOLVE,
        topology.UPSERT,
        topology.RETRY,
        topology.RESOLVED,
        topology.LOOKUP,
        topology.KNOWN,
    }
    channels = doc["channels"]
    # Reply channels have no address of their own: the request's reply_to says where.
    assert {channel["address"] for channel in channels.values()} == {*keys, None}
    operations = doc["operations"].values()
    for route in ROUTES:
        channel = channels[route.channel_id]
        name = route.model.__name__
        assert channel["messages"] == {name: {"$ref": f"#/components/messages/{name}"}}
        assert doc["components"]["messages"][name]["payload"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        mine = [
            op for op in operations if op["channel"]["$ref"] == f"#/channels/{route.channel_id}"
        ]
        assert sorted(op["action"] for op in mine) == ["receive", "send"]
        sender = next(op for op in mine if op["action"] == "send")
        assert sender["summary"].startswith(route.senders)
    lookup = doc["operations"]["send_geoLookup"]["reply"]
    assert lookup["address"]["location"] == "$message.header#/reply_to"
    assert lookup["channel"] == {"$ref": "#/channels/geoLookupReply"}
    replies = {m["$ref"].rsplit("/", 1)[1] for m in lookup["messages"]}
    assert replies == {"GeoLookupReply", "RequestError"}
    assert doc["components"]["messages"]["GeoLookupRequest"]["correlationId"]["location"] == (
        "$message.header#/correlation_id"
    )
    ip_seen = channels["ipSeen"]["description"]
    assert "Public" in ip_seen
    assert "other BanGUI components" in ip_seen


def test_servers_and_vhost_are_the_compose_broker(doc: dict[str, Any]) -> None:
    definitions = json.loads((REPO / "deploy" / "rabbitmq" / "definitions.json").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    url = str(compose["services"]["resolver"]["environment"]["GEO_AMQP_URL"])
    compose_vhost = re.search(r"@rabbitmq:5672/([\w.-]+)\}?\"?$", url)
    assert compose_vhost is not None, url
    (vhost,) = [v["name"] for v in definitions["vhosts"]]
    assert compose_vhost.group(1) == vhost
    assert doc["servers"]["compose"]["host"] == "rabbitmq:5672"
    assert doc["servers"]["compose"]["pathname"] == f"/{vhost}"
    for channel in doc["channels"].values():
        if channel["address"] is None:  # replies: the default exchange, at the reply_to
            continue
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert (exchange["name"], exchange["vhost"]) == ("bangui", vhost)


# --- the schemas judge bodies as the services do -----------------------------------------------


def schema_verdict(doc: dict[str, Any], routing_key: str, body: bytes) -> bool:
    """Whether a component validating against asyncapi.yaml would accept ``body``."""
    name = MODELS[routing_key].__name__
    try:
        instance = json.loads(body)
    except ValueError:
        return False  # not JSON (or not UTF-8): no schema accepts it
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())
    return validator.is_valid(instance)


def service_verdict(routing_key: str, body: bytes) -> bool:
    try:
        decode(MODELS[routing_key], body, MAX_BYTES)
    except Rejected:
        return False
    return True


def bodies() -> list[tuple[str, str, bytes]]:
    """(label, routing key, body) for every hostile and edge-case body the size check passes:
    the size limit and duplicate keys are checked before the schema, as info.description says."""
    out = [(label, topology.IP_SEEN, body) for label, body in HOSTILE_IP_SEEN.items()]
    out += [(label, key, body) for label, (key, body) in HOSTILE_ELSEWHERE.items()]
    out += [(label, topology.IP_SEEN, body) for label, (body, _) in EDGE_IP_SEEN.items()]
    out += [(label, topology.LOOKUP, body) for label, body in EDGE_LOOKUP.items()]
    return [entry for entry in out if len(entry[2]) <= MAX_BYTES]


def test_the_schemas_refuse_exactly_what_the_services_refuse(doc: dict[str, Any]) -> None:
    judged = bodies()
    edges = len(EDGE_IP_SEEN) + len(EDGE_LOOKUP)
    assert len(judged) == len(HOSTILE_IP_SEEN) + len(HOSTILE_ELSEWHERE) + edges - 1
    disagreements = [
        (label, key, service_verdict(key, body), schema_verdict(doc, key, body))
        for label, key, body in judged
        if service_verdict(key, body) != schema_verdict(doc, key, body)
    ]
    assert disagreements == []
    # And each edge case is judged as its label says, so agreement is not agreement on nonsense.
    for label, (body, accepted) in EDGE_IP_SEEN.items():
        assert service_verdict(topology.IP_SEEN, body) is accepted, label
    for label, body in EDGE_LOOKUP.items():
        assert service_verdict(topology.LOOKUP, body), label
    for label, (key, body) in HOSTILE_ELSEWHERE.items():
        assert not service_verdict(key, body), label


def test_the_readme_example_body_is_accepted_by_both(doc: dict[str, Any]) -> None:
    example = b'{"ips": ["198.51.100.1", "2001:db8::1", "::ffff:192.0.2.9"], "jail": "sshd"}'
    assert schema_verdict(doc, topology.IP_SEEN, example)
    assert service_verdict(topology.IP_SEEN, example)


# --- the address pattern is the address parser -------------------------------------------------

PATTERN = re.compile(IP_PATTERN)


def accepted_by_parser(text: str) -> bool:
    try:
        normalize_ip(text)
    except ValueError:
        return False
    return True


def spellings(rng: random.Random, number: int) -> list[str]:
    """Ways to write one IPv6 address: compressed, exploded, upper case, embedded IPv4."""
    address = ipaddress.IPv6Address(number)
    groups = address.exploded.split(":")
    out = [address.compressed, address.exploded, address.compressed.upper()]
    v4 = ipaddress.IPv4Address(number & 0xFFFFFFFF)
    out.append(":".join(groups[:6]) + ":" + str(v4))
    out.append(":".join(g.lstrip("0") or "0" for g in groups))
    return out


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**128 - 1), st.randoms(use_true_random=False))
def test_pattern_accepts_every_spelling_the_parser_accepts(number: int, rng: random.Random) -> None:
    for text in spellings(rng, number):
        assert accepted_by_parser(text) is bool(PATTERN.search(text)), text


MUTATIONS = [":", "::", ".", "0", "00000", "g", "%1", " ", "\n", "1.2.3.4", "ffff:"]


@settings(max_examples=600, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**128 - 1),
    st.sampled_from(MUTATIONS),
    st.integers(min_value=0, max_value=45),
)
def test_pattern_and_parser_agree_on_mangled_addresses(number: int, insert: str, at: int) -> None:
    for text in (str(ipaddress.IPv6Address(number)), str(ipaddress.IPv4Address(number % 2**32))):
        mangled = text[:at] + insert + text[at:]
        assert accepted_by_parser(mangled) is bool(PATTERN.search(mangled)), mangled
