"""SQS transport: aioboto3 client, idempotent queue bootstrap, retries and a circuit breaker.

Every call goes through `guarded_call`: transient errors (connection, timeout, throttling, 5xx)
are retried with exponential backoff and full jitter (waits capped at 1, 2, 4, 8, 16 s by default),
and each failed try counts towards the circuit breaker, which opens after 5 consecutive failures;
an open breaker fails calls at once until its cool-down ends, then lets a probe through.
"""

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

import aioboto3
import botocore.exceptions
from aiobotocore.config import AioConfig
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from dagster_taskiq.errors import CircuitOpen, TransportError
from dagster_taskiq.logs import get_logger
from dagster_taskiq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs.client import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeNameType
else:
    SQSClient = QueueAttributeNameType = object

T = TypeVar('T')
log = get_logger(__name__)

MAX_RECEIVE_BATCH = 10  # SQS's limit per ReceiveMessage
MAX_WAIT_S = 20  # SQS's longest long poll
MAX_REASON_CHARS = 1000
DLQ_RETENTION_S = 14 * 24 * 3600
_THROTTLING_CODES = {'Throttling', 'ThrottlingException', 'RequestThrottled', 'ServiceUnavailable'}


class BreakerState(StrEnum):
    CLOSED = 'closed'
    OPEN = 'open'
    HALF_OPEN = 'half-open'


class CircuitBreaker:
    """Counts consecutive failures; open after `threshold` of them, half-open after `cooldown_s`."""

    def __init__(
        self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at < self.cooldown_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def seconds_until_probe(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def check(self, what: str) -> None:
        if self.state is BreakerState.OPEN:
            raise CircuitOpen(
                f'{what}: circuit open after {self.failures} consecutive failures; '
                f'next probe in {self.seconds_until_probe():.1f} s'
            )

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the endpoint was unreachable, slow, throttling or failing on its side."""
    if isinstance(
        error,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ReadTimeoutError,
    ):
        return True
    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get('ResponseMetadata', {}).get('HTTPStatusCode', 0)
        return error.response.get('Error', {}).get('Code') in _THROTTLING_CODES or status >= 500
    return False


async def guarded_call(
    breaker: CircuitBreaker, settings: Settings, what: str, call: Callable[[], Awaitable[T]]
) -> T:
    """`call()` with retries on transient errors, gated by `breaker`.

    botocore errors become TransportError; CircuitOpen passes through.
    """

    async def tried() -> T:
        breaker.check(what)
        try:
            result = await call()
        except Exception as error:
            if is_transient(error):
                breaker.record_failure()
                log.warning(
                    'aws_call_failed', call=what, error=str(error), failures=breaker.failures
                )
            raise
        breaker.record_success()
        return result

    retrying = AsyncRetrying(
        wait=wait_random_exponential(multiplier=settings.retry_base_s, max=settings.retry_max_s),
        stop=stop_after_attempt(settings.retry_attempts),
        retry=retry_if_exception(
            lambda error: is_transient(error) and breaker.state is not BreakerState.OPEN
        ),
        reraise=True,
    )
    try:
        return await retrying(tried)
    except CircuitOpen:
        raise
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise TransportError(f'{what} failed: {error}') from error


def client_config() -> AioConfig:
    """botocore's own retries off (guarded_call retries), reads long enough for a long poll."""
    return AioConfig(
        retries={'max_attempts': 1, 'mode': 'standard'},
        connect_timeout=5,
        read_timeout=MAX_WAIT_S + 10,
    )


@asynccontextmanager
async def sqs_client(settings: Settings) -> AsyncIterator[SQSClient]:
    """An SQS client for the configured endpoint and region."""
    session = aioboto3.Session(region_name=settings.aws_region)
    async with session.client(
        'sqs', endpoint_url=settings.aws_endpoint_url, config=client_config()
    ) as client:
        yield client


@dataclass(frozen=True)
class QueueUrls:
    queue_url: str
    dlq_url: str


@dataclass(frozen=True)
class QueueDepth:
    visible: int
    in_flight: int
    delayed: int


@dataclass(frozen=True)
class Received:
    message_id: str
    receipt_handle: str
    body: str
    attributes: Mapping[str, str]
    receive_count: int
    sent_at_ms: int


async def _ensure_queue(
    client: SQSClient, name: str, attributes: Mapping[QueueAttributeNameType, str]
) -> str:
    try:
        url = (await client.get_queue_url(QueueName=name))['QueueUrl']
    except client.exceptions.QueueDoesNotExist:
        return (await client.create_queue(QueueName=name, Attributes=attributes))['QueueUrl']
    await client.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


async def bootstrap(client: SQSClient, settings: Settings, breaker: CircuitBreaker) -> QueueUrls:
    """Create (or bring up to date) the step queue and its dead-letter queue; safe to repeat."""

    async def ensure_both() -> QueueUrls:
        dlq_url = await _ensure_queue(
            client, settings.dlq_name, {'MessageRetentionPeriod': str(DLQ_RETENTION_S)}
        )
        dlq_attributes = await client.get_queue_attributes(
            QueueUrl=dlq_url, AttributeNames=['QueueArn']
        )
        redrive = {
            'deadLetterTargetArn': dlq_attributes['Attributes']['QueueArn'],
            'maxReceiveCount': str(settings.max_receive_count),
        }
        queue_url = await _ensure_queue(
            client,
            settings.queue_name,
            {
                'VisibilityTimeout': str(settings.visibility_timeout_s),
                'RedrivePolicy': json.dumps(redrive),
            },
        )
        return QueueUrls(queue_url=queue_url, dlq_url=dlq_url)

    urls = await guarded_call(breaker, settings, 'bootstrap', ensure_both)
    log.info('queues_ready', queue_url=urls.queue_url, dlq_url=urls.dlq_url)
    return urls


def _string_attributes(attributes: Mapping[str, str | int]) -> dict[str, dict[str, str]]:
    return {
        name: {'DataType': 'String', 'StringValue': str(value)}
        for name, value in attributes.items()
    }


class SqsQueue:
    """The step queue and its dead-letter queue, every call guarded by one circuit breaker."""

    def __init__(
        self, client: SQSClient, urls: QueueUrls, settings: Settings, breaker: CircuitBreaker
    ) -> None:
        self.client = client
        self.urls = urls
        self.settings = settings
        self.breaker = breaker

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await guarded_call(self.breaker, self.settings, what, call)

    async def send(self, body: str, attributes: Mapping[str, str | int]) -> str:
        """Send a message to the step queue; returns its message id."""
        response = await self._call(
            'send',
            lambda: self.client.send_message(
                QueueUrl=self.urls.queue_url,
                MessageBody=body,
                MessageAttributes=_string_attributes(attributes),  # type: ignore[arg-type]
            ),
        )
        return response['MessageId']

    async def _receive(
        self, queue_url: str, max_messages: int, wait_s: int, visibility_timeout_s: int
    ) -> list[Received]:
        if not 1 <= max_messages <= MAX_RECEIVE_BATCH:
            raise ValueError(f'max_messages must be 1 to {MAX_RECEIVE_BATCH}, not {max_messages}')
        response = await self._call(
            'receive',
            lambda: self.client.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=min(wait_s, MAX_WAIT_S),
                VisibilityTimeout=visibility_timeout_s,
                MessageAttributeNames=['All'],
                MessageSystemAttributeNames=['ApproximateReceiveCount', 'SentTimestamp'],
            ),
        )
        return [
            Received(
                message_id=message['MessageId'],
                receipt_handle=message['ReceiptHandle'],
                body=message.get('Body', ''),
                attributes={
                    name: value.get('StringValue', '')
                    for name, value in message.get('MessageAttributes', {}).items()
                },
                receive_count=int(message.get('Attributes', {}).get('ApproximateReceiveCount', 1)),
                sent_at_ms=int(message.get('Attributes', {}).get('SentTimestamp', 0)),
            )
            for message in response.get('Messages', [])
        ]

    async def receive(
        self, max_messages: int, wait_s: int = MAX_WAIT_S, visibility_timeout_s: int | None = None
    ) -> list[Received]:
        """Long-poll the step queue for up to `max_messages` (1 to 10) messages."""
        return await self._receive(
            self.urls.queue_url,
            max_messages,
            wait_s,
            visibility_timeout_s or self.settings.visibility_timeout_s,
        )

    async def delete(self, receipt_handle: str) -> None:
        await self._call(
            'delete',
            lambda: self.client.delete_message(
                QueueUrl=self.urls.queue_url, ReceiptHandle=receipt_handle
            ),
        )

    async def change_visibility(self, receipt_handle: str, visibility_timeout_s: int) -> None:
        await self._call(
            'change_visibility',
            lambda: self.client.change_message_visibility(
                QueueUrl=self.urls.queue_url,
                ReceiptHandle=receipt_handle,
                VisibilityTimeout=visibility_timeout_s,
            ),
        )

    async def depth(self) -> QueueDepth:
        response = await self._call(
            'depth',
            lambda: self.client.get_queue_attributes(
                QueueUrl=self.urls.queue_url,
                AttributeNames=[
                    'ApproximateNumberOfMessages',
                    'ApproximateNumberOfMessagesNotVisible',
                    'ApproximateNumberOfMessagesDelayed',
                ],
            ),
        )
        attributes = response['Attributes']
        return QueueDepth(
            visible=int(attributes.get('ApproximateNumberOfMessages', 0)),
            in_flight=int(attributes.get('ApproximateNumberOfMessagesNotVisible', 0)),
            delayed=int(attributes.get('ApproximateNumberOfMessagesDelayed', 0)),
        )

    async def send_to_dlq(self, body: str, reason: str, attributes: Mapping[str, str | int]) -> str:
        """Move a message that cannot be processed to the dead-letter queue, with its reason."""
        reason = reason[:MAX_REASON_CHARS]
        response = await self._call(
            'send_to_dlq',
            lambda: self.client.send_message(
                QueueUrl=self.urls.dlq_url,
                MessageBody=body or '(empty)',
                MessageAttributes=_string_attributes({**attributes, 'reason': reason}),  # type: ignore[arg-type]
            ),
        )
        log.warning('message_dead_lettered', reason=reason, **attributes)
        return response['MessageId']

    async def peek_dlq(
        self, max_messages: int = MAX_RECEIVE_BATCH, wait_s: int = 0
    ) -> list[Received]:
        """Read the dead-letter queue (for reports and tests); the messages stay there."""
        return await self._receive(self.urls.dlq_url, max_messages, wait_s, visibility_timeout_s=0)


async def resolve_urls(client: SQSClient, settings: Settings, breaker: CircuitBreaker) -> QueueUrls:
    """URLs of the existing step queue (`queue_url`, else by `queue_name`) and of its DLQ."""

    async def resolve() -> QueueUrls:
        queue_url = (
            settings.queue_url
            or (await client.get_queue_url(QueueName=settings.queue_name))['QueueUrl']
        )
        attributes = await client.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=['RedrivePolicy']
        )
        redrive = json.loads(attributes.get('Attributes', {}).get('RedrivePolicy', '{}'))
        dlq_arn = redrive.get('deadLetterTargetArn')
        if not dlq_arn:
            raise TransportError(f'queue {queue_url} has no dead-letter queue (RedrivePolicy)')
        dlq_url = (await client.get_queue_url(QueueName=dlq_arn.rsplit(':', 1)[-1]))['QueueUrl']
        return QueueUrls(queue_url=queue_url, dlq_url=dlq_url)

    return await guarded_call(breaker, settings, 'resolve_urls', resolve)


@asynccontextmanager
async def open_queue(settings: Settings) -> AsyncIterator[SqsQueue]:
    """The configured, existing queue ready to use (`dagster-taskiq bootstrap` creates it)."""
    breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
    async with sqs_client(settings) as client:
        urls = await resolve_urls(client, settings, breaker)
        yield SqsQueue(client, urls, settings, breaker)
