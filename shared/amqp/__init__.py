"""All AMQP plumbing, and the only package that imports aio_pika.

It connects (robustly, with bounded retries, to one broker or in turn to the nodes of a cluster),
declares the topology, publishes models with publisher confirms, and consumes queues: it decodes
each body into its model at the edge, sends what can never succeed to ``geo.dead_letter`` with
the reason in a header, requeues transient failures after a back-off, and acks only after the
handler's effect is durable; it checks the topology is still there while a service runs.
``connection``, ``publisher``, ``service``, ``keeper`` and ``deadletters`` (the CLI's
administration of ``geo.dead_letter``) each hold one part; ``memory`` is an in-memory broker
with the same consumers, for tests.
"""

from aio_pika.abc import AbstractRobustConnection as BrokerConnection

from shared.amqp.config import AmqpConfig, amqp_config
from shared.amqp.connection import (
    BrokerError,
    BrokerUnreachable,
    PublishFailed,
    connect,
    connect_once,
    open_channel,
    redacted,
)
from shared.amqp.deadletters import (
    PurgeReport,
    ReplayOutcome,
    peek_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from shared.amqp.keeper import declare_topology
from shared.amqp.publisher import AmqpPublisher, ExchangePublisher
from shared.amqp.service import Amqp, AmqpTicket, Consumer
from shared.deadletters import DeadLetter, dead_letter_from

__all__ = [
    "Amqp",
    "AmqpConfig",
    "AmqpPublisher",
    "AmqpTicket",
    "BrokerConnection",
    "BrokerError",
    "BrokerUnreachable",
    "Consumer",
    "DeadLetter",
    "ExchangePublisher",
    "PublishFailed",
    "PurgeReport",
    "ReplayOutcome",
    "amqp_config",
    "connect",
    "connect_once",
    "dead_letter_from",
    "declare_topology",
    "open_channel",
    "peek_dead_letters",
    "purge_dead_letters",
    "redacted",
    "replay_dead_letters",
]
