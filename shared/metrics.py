"""``/metrics`` (Prometheus text format) and ``/health`` for each service, on ``GEO_METRICS_PORT``.

Metrics are read from the counters the services already keep (consumers, cache, state) through
callables registered at bootstrap, so nothing is counted twice and the hot paths do no extra work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from shared.settings import Settings

Reading = Callable[[], float | int]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    read: Reading
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class MetricsRegistry:
    service: str
    metrics: list[Metric] = field(default_factory=list)

    def counter(self, name: str, help_: str, read: Reading, **labels: str) -> None:
        self.metrics.append(Metric(name, "counter", help_, read, tuple(sorted(labels.items()))))

    def gauge(self, name: str, help_: str, read: Reading, **labels: str) -> None:
        self.metrics.append(Metric(name, "gauge", help_, read, tuple(sorted(labels.items()))))

    def render(self) -> str:
        lines: list[str] = []
        described: set[str] = set()
        for metric in self.metrics:
            if metric.name not in described:
                described.add(metric.name)
                lines.append(f"# HELP {metric.name} {metric.help}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
            labels = (("service", self.service), *metric.labels)
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{metric.name}{{{text}}} {_number(metric.read())}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class ConsumerHealth:
    """What /health needs to know of one consumer, in seconds before now (None: never)."""

    queue: str
    oldest_unsettled_s: float | None
    dead_letter_failed_s: float | None


@dataclass(frozen=True)
class Health:
    status: str  # "ok", or what is wrong first: broker_disconnected, consumer_stuck, ...
    problems: tuple[str, ...] = ()


def health_of(
    *,
    connected: bool,
    fault: str | None,
    consumers: Iterable[ConsumerHealth],
    stuck_after_s: float,
    failing_for_s: float,
) -> Health:
    """Not "ok" while disconnected, once the service lost its topology, while a delivery has
    been held unsettled for longer than ``stuck_after_s``, and for ``failing_for_s`` after a
    dead letter could not be published (its delivery was settled, but left to the broker)."""
    problems: list[tuple[str, str]] = []
    if fault is not None:
        problems.append(("topology_lost", fault))
    if not connected:
        problems.append(("broker_disconnected", "not connected to the broker"))
    for consumer in consumers:
        age = consumer.oldest_unsettled_s
        if age is not None and age > stuck_after_s:
            problems.append(
                ("consumer_stuck", f"{consumer.queue}: a delivery unsettled for {age:.0f} s")
            )
        failed = consumer.dead_letter_failed_s
        if failed is not None and failed < failing_for_s:
            problems.append(
                (
                    "dead_letter_failing",
                    f"{consumer.queue}: a dead letter could not be published {failed:.0f} s ago",
                )
            )
    if not problems:
        return Health("ok")
    return Health(problems[0][0], tuple(text for _, text in problems))


class MetricsServer:
    """Serves the registry and a health check; started and stopped by the service's bootstrap."""

    def __init__(
        self, registry: MetricsRegistry, health: Callable[[], Health], host: str, port: int
    ) -> None:
        self._registry = registry
        self._health_of = health
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            text=self._registry.render(), content_type="text/plain", charset="utf-8"
        )

    async def _health(self, _request: web.Request) -> web.Response:
        health = self._health_of()
        body: dict[str, object] = {"service": self._registry.service, "status": health.status}
        if health.problems:
            body["problems"] = list(health.problems)
        return web.json_response(body, status=200 if health.status == "ok" else 503)


async def serve_metrics(
    settings: Settings, registry: MetricsRegistry, health: Callable[[], Health]
) -> MetricsServer | None:
    """Start the metrics server when ``GEO_METRICS_PORT`` is set; None otherwise."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(registry, health, settings.metrics_host, settings.metrics_port)
    await server.start()
    return server
