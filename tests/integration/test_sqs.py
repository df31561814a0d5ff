"""The SQS transport against a real moto server over HTTP."""

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from dagster_taskiq.errors import CircuitOpen, TransportError
from dagster_taskiq.resilience import BreakerState, CircuitBreaker, guarded_call
from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import QueueDepth, bootstrap, bootstrap_queues, open_queue, sqs_client
from dagster_taskiq_demo.emulator import MotoServer, start_moto
from tests.waiting import eventually


async def test_bootstrap_is_idempotent_and_wires_the_dlq(settings: Settings) -> None:
    async with sqs_client(settings) as client:
        first = await bootstrap(client, settings, CircuitBreaker(5, 30))
        second = await bootstrap(client, settings, CircuitBreaker(5, 30))
        assert first == second
        assert first.queue_url.endswith(f'/{settings.queue_name}')
        assert first.dlq_url.endswith(f'/{settings.queue_name}-dlq')
        attributes = (
            await client.get_queue_attributes(QueueUrl=first.queue_url, AttributeNames=['All'])
        )['Attributes']
        dlq_arn = (
            await client.get_queue_attributes(QueueUrl=first.dlq_url, AttributeNames=['QueueArn'])
        )['Attributes']['QueueArn']
    redrive = json.loads(attributes['RedrivePolicy'])
    assert redrive['deadLetterTargetArn'] == dlq_arn
    assert int(redrive['maxReceiveCount']) == settings.max_receive_count
    assert attributes['VisibilityTimeout'] == str(settings.visibility_timeout_s)


async def test_open_queue_finds_the_dlq_by_name_or_by_url(settings: Settings) -> None:
    await bootstrap_queues(settings)
    async with open_queue(settings) as by_name:
        urls = by_name.urls
    async with open_queue(settings.model_copy(update={'queue_url': urls.queue_url})) as by_url:
        assert by_url.urls == urls


async def test_open_queue_without_the_queue_says_so(settings: Settings) -> None:
    with pytest.raises(TransportError, match=r'resolve_urls failed: .*NonExistentQueue'):
        async with open_queue(settings):
            pass


async def test_send_receive_visibility_delete_and_depth(settings: Settings) -> None:
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        message_id = await queue.send(
            '{"hello": 1}', {'run_id': 'r1', 'step_key': 's[0]', 'attempt': 0}
        )
        assert await queue.depth() == QueueDepth(visible=1, in_flight=0, delayed=0)
        [received] = await queue.receive(10, wait_s=1)
        assert received.message_id == message_id
        assert received.body == '{"hello": 1}'
        assert received.attributes == {'run_id': 'r1', 'step_key': 's[0]', 'attempt': '0'}
        assert received.receive_count == 1
        assert received.sent_at_ms > 0
        assert await queue.depth() == QueueDepth(visible=0, in_flight=1, delayed=0)
        await queue.change_visibility(received, 0)
        [again] = await queue.receive(10, wait_s=1)
        assert again.message_id == message_id and again.receive_count == 2
        await queue.delete(again)
        assert await queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)
        assert await queue.receive(10, wait_s=0) == []


async def test_retries_are_received_before_a_backlog_of_first_attempts(
    settings: Settings,
) -> None:
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        for index in range(20):
            await queue.send(f'first attempt {index}', {})
        retry_id = await queue.send('a retry', {}, retry=True)  # both queues: see `send`
        assert await queue.depth() == QueueDepth(visible=22, in_flight=0, delayed=0)
        [received] = await queue.receive(1, wait_s=1)
        assert (received.message_id, received.queue_url) == (retry_id, queue.urls.retry_queue_url)
        await queue.delete(received)  # through the queue it came from
        assert await queue.depth() == QueueDepth(visible=21, in_flight=0, delayed=0)
        [first] = await queue.receive(1, wait_s=1)
        assert first.queue_url == queue.urls.queue_url


async def test_an_idle_workers_long_poll_sees_a_retry_at_once(settings: Settings) -> None:
    """A worker with nothing to do waits in the step queue's long poll, not the retry queue's:
    the retry's copy there reaches it without waiting for the poll to end."""
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        polling = asyncio.ensure_future(queue.receive(1, wait_s=20))
        await asyncio.sleep(0.5)  # the fault: the retry is sent while the poll waits
        started = time.monotonic()
        await queue.send('a retry', {}, retry=True)
        [received] = await asyncio.wait_for(polling, timeout=10)
        assert received.body == 'a retry'
        assert time.monotonic() - started < 5  # not the 20 s poll


async def test_receive_takes_at_most_n(settings: Settings) -> None:
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        for index in range(5):
            await queue.send(str(index), {})
        assert 1 <= len(await queue.receive(2, wait_s=1)) <= 2
        with pytest.raises(ValueError, match='max_messages'):
            await queue.receive(11)


async def test_send_to_dlq_keeps_the_body_and_the_reason(settings: Settings) -> None:
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        await queue.send_to_dlq('not json', 'bad JSON: Expecting value', {'message_id': 'm-1'})
        [dead] = await queue.peek_dlq(wait_s=1)
    assert dead.body == 'not json'
    assert dead.attributes == {'reason': 'bad JSON: Expecting value', 'message_id': 'm-1'}


def fragile_settings(server: MotoServer, queue_name: str, **changes: float) -> Settings:
    defaults = {'retry_base_s': 0.05, 'retry_max_s': 0.2, 'breaker_cooldown_s': 0.5}
    return Settings(aws_endpoint_url=server.url, queue_name=queue_name, **{**defaults, **changes})


@pytest.fixture
def own_moto() -> Iterator[MotoServer]:
    """A moto server this test may stop and restart (on the same port)."""
    server = start_moto()
    yield server
    server.stop()


async def test_retries_ride_out_a_restart_of_the_endpoint(own_moto: MotoServer) -> None:
    settings = fragile_settings(
        own_moto,
        'ride-out',
        retry_base_s=0.3,
        retry_max_s=1.0,
        retry_attempts=20,
        breaker_threshold=20,
    )
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        own_moto.stop()
        # A call that needs no state: the restarted emulator starts empty.
        listing = asyncio.create_task(
            guarded_call(queue.breaker, settings, 'list', lambda: queue.client.list_queues())
        )

        async def failed_once() -> bool:
            return queue.breaker.failures >= 1

        await eventually(failed_once, what='a failed try')
        restarted = start_moto(own_moto.port)
        try:
            assert 'QueueUrls' not in await listing
            assert queue.breaker.state is BreakerState.CLOSED and queue.breaker.failures == 0
        finally:
            restarted.stop()


@pytest.mark.slow
async def test_breaker_opens_fails_fast_and_closes_after_a_probe(own_moto: MotoServer) -> None:
    settings = fragile_settings(own_moto, 'breaker')
    await bootstrap_queues(settings)
    async with open_queue(settings) as queue:
        own_moto.stop()
        with pytest.raises(TransportError, match='depth failed'):
            await queue.depth()
        assert queue.breaker.failures == 5
        assert queue.breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await queue.send('x', {})
        assert queue.breaker.failures == 5  # failed fast: refused before any try, none retried
        restarted = start_moto(own_moto.port)
        try:
            await bootstrap_queues(settings)

            async def probe_allowed() -> bool:
                return queue.breaker.state is BreakerState.HALF_OPEN

            await eventually(probe_allowed, what='half-open breaker')
            await queue.send('x', {})
            assert queue.breaker.state is BreakerState.CLOSED
            assert (await queue.depth()).visible == 1
        finally:
            restarted.stop()
