"""Worker health and Prometheus metrics over HTTP: `/healthz` and `/metrics`."""

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dagster_taskiq.errors import ConfigError


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            'taskiq_messages_received', 'Messages received from SQS', registry=self.registry
        )
        self.claimed = Counter('taskiq_steps_claimed', 'Attempts claimed', registry=self.registry)
        self.duplicates = Counter(
            'taskiq_duplicate_deliveries',
            'Deliveries refused because the attempt was not QUEUED',
            registry=self.registry,
        )
        self.completed = Counter(
            'taskiq_steps_completed', 'Attempts completed', registry=self.registry
        )
        self.failed = Counter('taskiq_steps_failed', 'Attempts failed', registry=self.registry)
        self.dead_lettered = Counter(
            'taskiq_messages_dead_lettered', 'Messages sent to the DLQ', registry=self.registry
        )
        self.in_flight = Gauge(
            'taskiq_steps_in_flight', 'Steps running now', registry=self.registry
        )
        self.step_duration = Histogram(
            'taskiq_step_duration_seconds',
            'Wall time of a step process',
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )


@asynccontextmanager
async def health_and_metrics_server(
    port: int, registry: CollectorRegistry, health: Callable[[], Mapping[str, object]]
) -> AsyncIterator[None]:
    """Serve `/healthz` (`health()` as JSON) and `/metrics` (`registry`) on `port` while inside.

    A port that cannot be bound is a ConfigError at once, not a task that dies later.
    """

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(dict(health()))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={'Content-Type': CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.add_routes([web.get('/healthz', healthz), web.get('/metrics', metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, '0.0.0.0', port).start()
    except OSError as error:
        await runner.cleanup()
        message = f'cannot serve /healthz and /metrics on port {port}: {error.strerror}'
        raise ConfigError(message) from error
    try:
        yield
    finally:
        await runner.cleanup()
