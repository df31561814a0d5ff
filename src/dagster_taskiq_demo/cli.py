"""`dagster-taskiq-demo`: the demo's local stack.

For now `up` starts the emulator, creates the queues, migrates the store and carries one signed step
message (and one malformed one) through the exactly-once path; the executor and auto-scaler issues
make it the full stack of DESIGN.md.
"""

import asyncio
import os
import socket
import time
import uuid

import click
from dagster import reconstructable
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs

from dagster_taskiq import message, store
from dagster_taskiq.errors import InvalidMessage
from dagster_taskiq.logs import configure_logging, get_logger
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import CircuitBreaker, SqsQueue, bootstrap, sqs_client
from dagster_taskiq.store import Claimed, StepState
from dagster_taskiq_demo.definitions import fast_job
from dagster_taskiq_demo.emulator import DEFAULT_MOTO_PORT, EMULATOR_CREDENTIALS, start_moto

log = get_logger(__name__)


@click.group()
def main() -> None:
    """The dagster-taskiq demo application."""
    configure_logging()


def demo_task(run_id: str) -> message.OpExecutionTask:
    args = ExecuteStepArgs(
        job_origin=reconstructable(fast_job).get_python_origin(),
        run_id=run_id,
        step_keys_to_execute=['ping'],
        retry_mode=RetryMode.ENABLED,
        known_state=KnownExecutionState(),
        should_verify_step=True,
    )
    return message.build_task(args, job_name=fast_job.name, enqueued_at=time.time())


async def process_one(queue: SqsQueue, settings: Settings, worker_id: str) -> None:
    """Receive one message and carry it through parse, claim, finish and delete."""
    engine = store.async_engine(settings.database_url)
    try:
        [received] = await queue.receive(1, wait_s=5)
        try:
            task = message.parse(received.body, settings.signing_key_bytes)
        except InvalidMessage as error:
            await queue.send_to_dlq(received.body, str(error), {'message_id': received.message_id})
            await queue.delete(received.receipt_handle)
            return
        outcome = await store.claim(
            engine, task.idempotency_key, worker_id=worker_id, lease_s=settings.lease_s
        )
        if isinstance(outcome, Claimed):
            await store.finish(
                engine, task.idempotency_key, token=outcome.token, outcome=StepState.COMPLETED
            )
        await queue.delete(received.receipt_handle)
        row = await store.get_execution(engine, task.idempotency_key)
        log.info('demo_step_processed', key=task.idempotency_key, state=row and row['state'])
    finally:
        await engine.dispose()


async def smoke(settings: Settings) -> None:
    breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
    async with sqs_client(settings) as client:
        urls = await bootstrap(client, settings, breaker)
        queue = SqsQueue(client, urls, settings, breaker)
        task = demo_task(run_id=str(uuid.uuid4()))
        engine = store.async_engine(settings.database_url)
        try:
            await store.record_enqueued(
                engine,
                task.idempotency_key,
                run_id=task.run_id,
                job_name=task.job_name,
                step_key=task.step_key,
                attempt=task.attempt,
            )
        finally:
            await engine.dispose()
        body = message.encode(task, settings.signing_key_bytes)
        await queue.send(body, {'run_id': task.run_id, 'step_key': task.step_key, 'attempt': 0})
        worker_id = f'{socket.gethostname()}-{os.getpid()}'
        await process_one(queue, settings, worker_id)
        await queue.send('{"v": 1, "broken": ', {})
        await process_one(queue, settings, worker_id)
        dead = await queue.peek_dlq(wait_s=1)
        click.echo(f'dead-lettered: {[m.attributes.get("reason") for m in dead]}')


@main.command()
@click.option('--moto-port', default=DEFAULT_MOTO_PORT, show_default=True)
def up(moto_port: int) -> None:
    """Start moto, create the queues, migrate the store and process a demo message."""
    os.environ.update({k: os.environ.get(k, v) for k, v in EMULATOR_CREDENTIALS.items()})
    server = start_moto(moto_port)
    try:
        settings = Settings(aws_endpoint_url=server.url)
        click.echo(f'emulator on {server.url}; database {settings.database_url}')
        store.upgrade(settings.database_url)
        asyncio.run(smoke(settings))
    finally:
        server.stop()
