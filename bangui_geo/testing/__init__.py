"""Running the geo services for real in integration tests: bangui-geo's own suite and benchmark
use it, and so can another BanGUI component that wants the resolver, timer and persistence
running against its broker in its own tests.

``ServiceGroup`` starts each service by its contract start command with the ``GEO_*`` settings it
needs, restarts, kills and stops them (exit codes), reads the ``geo_cache`` rows they wrote
(SQLite or PostgreSQL) and their JSON log events, and kills whatever still runs at teardown.
Beside it: publishing and draining on the broker, polling with a deadline, waiting for the
topology, the broker's management API (a vhost per test), a fresh PostgreSQL database per test,
and one generator of public addresses. Nothing here is needed at run time: the PostgreSQL
helpers import psycopg (the ``postgres`` extra) only when called, testcontainers only when no
broker URL is given.
"""

from bangui_geo.testing.amqp import (
    DURABLE_QUEUES,
    drain_queue,
    publish,
    queue_details,
    ready_count,
    vhost_of,
    vhost_queues,
    wait_for_topology,
)
from bangui_geo.testing.ips import iter_public_ips, non_global_ips, public_ips
from bangui_geo.testing.polling import async_poll, poll
from bangui_geo.testing.services import (
    REPO_ROOT,
    ServiceFailed,
    ServiceGroup,
    ServiceProcess,
    event_time,
    events,
    local_tcp_ports,
    read_rows,
    service_env,
)

__all__ = [
    "DURABLE_QUEUES",
    "REPO_ROOT",
    "ServiceFailed",
    "ServiceGroup",
    "ServiceProcess",
    "async_poll",
    "drain_queue",
    "event_time",
    "events",
    "iter_public_ips",
    "local_tcp_ports",
    "non_global_ips",
    "poll",
    "public_ips",
    "publish",
    "queue_details",
    "read_rows",
    "ready_count",
    "service_env",
    "vhost_of",
    "vhost_queues",
    "wait_for_topology",
]
