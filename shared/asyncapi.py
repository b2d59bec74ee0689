"""The AsyncAPI 3.0 description of the ``bangui`` exchange, generated from the message models.

``python -m shared.asyncapi > asyncapi.yaml`` regenerates the checked-in file; a unit test fails
when it is stale, validates it against the AsyncAPI 3.0 schema, and checks that its payload
schemas refuse what the services refuse. Written from a component's point of view: each route
says who sends it and who receives it, and the servers are the compose broker's.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel

from shared import topology
from shared.ipschema import IP_JSON_SCHEMA
from shared.messages import RequestError
from shared.routes import ROUTES, Route

__all__ = ["ROUTES", "Route", "document", "render"]

VHOST = "bangui"  # the vhost deploy/rabbitmq/definitions.json creates and compose uses
AMQP_BINDING_VERSION = "0.3.0"
IP_SCHEMA_NAME = "IpAddress"


REPLY_TO = "$message.header#/reply_to"
CORRELATION_ID = "$message.header#/correlation_id"

SERVERS = {
    "compose": {
        "host": "rabbitmq:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "pathname": f"/{VHOST}",
        "description": (
            "The broker of docker-compose.yml, as containers on the compose network reach it; "
            f"vhost '{VHOST}'. Publishers log in as 'bangui-publisher' (write on 'bangui', "
            "routing key ip.seen only)."
        ),
    },
    "compose-host": {
        "host": "localhost:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "pathname": f"/{VHOST}",
        "description": (
            "The same broker from the host running compose (RABBITMQ_AMQP_PORT, default 5672, "
            "bound to RABBITMQ_BIND_ADDRESS, default 127.0.0.1)."
        ),
    },
}


def _shared_ip_schema(node: Any) -> Any:
    """Every inline copy of the IP address schema, replaced by a reference to one definition."""
    if node == IP_JSON_SCHEMA:
        return {"$ref": f"#/components/schemas/{IP_SCHEMA_NAME}"}
    if isinstance(node, dict):
        return {key: _shared_ip_schema(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_shared_ip_schema(value) for value in node]
    return node


def _binding(route: Route[Any]) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": topology.EXCHANGE,
                "type": "topic",
                "durable": True,
                "autoDelete": False,
                "vhost": VHOST,
            },
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _operation(route: Route[Any], action: str, who: str) -> dict[str, Any]:
    verb = "sends" if action == "send" else "receives"
    queue = f" from queue '{route.queue.name}'" if action == "receive" and route.queue else ""
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{route.channel_id}"},
        "summary": f"{who} {verb} {route.routing_key}{queue}.",
        "messages": [{"$ref": f"#/channels/{route.channel_id}/messages/{route.model.__name__}"}],
    }
    if route.reply is not None:
        reply_id = _reply_channel_id(route)
        operation["reply"] = {
            "address": {
                "location": REPLY_TO,
                "description": "The request's AMQP reply_to property: RabbitMQ's direct "
                "reply-to (amq.rabbitmq.reply-to) or a queue of the requester's own.",
            },
            "channel": {"$ref": f"#/channels/{reply_id}"},
            "messages": [
                {"$ref": f"#/channels/{reply_id}/messages/{model.__name__}"}
                for model in _reply_models(route)
            ],
        }
    return operation


def _reply_channel_id(route: Route[Any]) -> str:
    return f"{route.channel_id}Reply"


def _reply_models(route: Route[Any]) -> list[type[BaseModel]]:
    assert route.reply is not None
    return [route.reply, RequestError] if route.public else [route.reply]


def _message(model: type[BaseModel], *, correlated: bool) -> dict[str, Any]:
    name = model.__name__
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{name}"},
    }
    if correlated:
        message["correlationId"] = {
            "location": CORRELATION_ID,
            "description": "The AMQP correlation_id property; the reply carries the request's.",
        }
    return message


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for route in ROUTES:
        name = route.model.__name__
        for model in [route.model, *(_reply_models(route) if route.reply else [])]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            messages[model.__name__] = _message(model, correlated=route.reply is not None)
        if route.reply is not None:
            channels[_reply_channel_id(route)] = {
                "address": None,
                "description": (
                    f"Replies to {route.routing_key}: published by {route.receivers} on the "
                    "default exchange with the request's reply_to as routing key and its "
                    "correlation_id."
                    + (
                        " A malformed request with a reply_to gets a RequestError and is acked; "
                        "one without a reply_to is dead-lettered."
                        if route.public
                        else ""
                    )
                ),
                "messages": {
                    m.__name__: {"$ref": f"#/components/messages/{m.__name__}"}
                    for m in _reply_models(route)
                },
            }
        scope = "Public" if route.public else "Internal to bangui-geo"
        channels[route.channel_id] = {
            "address": route.routing_key,
            "description": (
                f"{scope}. Routing key '{route.routing_key}' on exchange '{topology.EXCHANGE}'. "
                f"Sent by {route.senders}; received by {route.receivers}."
            ),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": _binding(route),
        }
        operations[f"send_{route.channel_id}"] = _operation(route, "send", route.senders)
        operations[f"receive_{route.channel_id}"] = _operation(route, "receive", route.receivers)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "bangui-geo",
            "version": "1.0.0",
            "description": (
                f"Messages on the durable topic exchange '{topology.EXCHANGE}' (vhost '{VHOST}' "
                "in the compose deployment), JSON, persistent, at most GEO_MAX_MESSAGE_BYTES "
                "(1 MiB by default) and without duplicate object keys (both are checked before "
                "the schema). Rejected messages go to "
                f"'{topology.DEAD_LETTER_EXCHANGE}' -> queue '{topology.DEAD_LETTER_QUEUE}' with "
                f"the reason in header '{topology.REASON_HEADER}'. Other components send "
                "ip.seen, may receive ip.resolved, and may ask geo.lookup (request/reply); the "
                "other routes are the services' own. "
                "Generated from shared/messages.py by `python -m shared.asyncapi`; do not edit "
                "by hand."
            ),
        },
        "defaultContentType": "application/json",
        "servers": SERVERS,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {
                IP_SCHEMA_NAME: dict(IP_JSON_SCHEMA),
                **_shared_ip_schema(dict(sorted(schemas.items()))),
            },
            "messages": messages,
        },
    }


def render() -> str:
    import yaml  # a development tool: PyYAML comes with the test extra

    text: str = yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=100)
    return "# Generated by `python -m shared.asyncapi > asyncapi.yaml`; do not edit.\n" + text


if __name__ == "__main__":
    sys.stdout.write(render())
