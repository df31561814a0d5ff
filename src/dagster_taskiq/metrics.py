"""Worker health and Prometheus metrics over HTTP: `/healthz` and `/metrics`."""

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from dagster_taskiq.worker import Worker


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


async def serve_health_and_metrics(worker: 'Worker', port: int, stop: asyncio.Event) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(
            {
                'status': 'stopping' if stop.is_set() else 'ok',
                'worker_id': worker.worker_id,
                'running': len(worker.running),
                'concurrency': worker.options.concurrency,
                'sqs_breaker': str(worker.queue.breaker.state),
                'db_breaker': str(worker.db_breaker.state),
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(worker.metrics.registry),
            headers={'Content-Type': CONTENT_TYPE_LATEST},
        )

    app = web.Application()
    app.add_routes([web.get('/healthz', healthz), web.get('/metrics', metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, '0.0.0.0', port).start()
    try:
        await asyncio.Event().wait()  # serve until cancelled, draining included
    finally:
        await runner.cleanup()
