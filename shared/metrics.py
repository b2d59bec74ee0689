"""``/metrics`` (Prometheus text format) and ``/health`` for each service, on ``GEO_METRICS_PORT``.

Metrics are read from the counters the services already keep (consumers, cache, state) through
callables registered at bootstrap, so nothing is counted twice and the hot paths do no extra work.
"""

from __future__ import annotations

from collections.abc import Callable
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


class MetricsServer:
    """Serves the registry and a health check; started and stopped by the service's bootstrap."""

    def __init__(
        self, registry: MetricsRegistry, healthy: Callable[[], bool], host: str, port: int
    ) -> None:
        self._registry = registry
        self._healthy = healthy
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
        ok = self._healthy()
        return web.json_response(
            {"service": self._registry.service, "status": "ok" if ok else "broker_disconnected"},
            status=200 if ok else 503,
        )


async def serve_metrics(
    settings: Settings, registry: MetricsRegistry, healthy: Callable[[], bool]
) -> MetricsServer | None:
    """Start the metrics server when ``GEO_METRICS_PORT`` is set; None otherwise."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(registry, healthy, settings.metrics_host, settings.metrics_port)
    await server.start()
    return server
