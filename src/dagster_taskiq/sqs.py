"""SQS transport: aioboto3 client, the idempotent queue bootstrap and the step queues.

Steps go to two queues: first attempts to the step queue; retries (and messages the executor sends
again) to its retry queue (`{queue}-retry`) too, which workers poll first, so a retry never waits
behind a backlog of first attempts. Both redrive to one dead-letter queue (`{queue}-dlq`).

Every call goes through `resilience.guarded_call` (retries with backoff, one circuit breaker per
queue), and botocore's errors come out as `TransportError`.
"""

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import aioboto3
import botocore.exceptions

from dagster_taskiq.errors import QueueMissing, TransportError
from dagster_taskiq.logs import get_logger
from dagster_taskiq.resilience import CircuitBreaker, aws_client_config, guarded_call
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
_MISSING_QUEUE_CODES = {'AWS.SimpleQueueService.NonExistentQueue', 'QueueDoesNotExist'}
MAX_REASON_CHARS = 1000
DLQ_RETENTION_S = 14 * 24 * 3600


@asynccontextmanager
async def sqs_client(settings: Settings) -> AsyncIterator[SQSClient]:
    """An SQS client for the configured endpoint and region."""
    session = aioboto3.Session(region_name=settings.aws_region)
    async with session.client(
        'sqs', endpoint_url=settings.aws_endpoint_url, config=aws_client_config()
    ) as client:
        yield client


@dataclass(frozen=True)
class QueueUrls:
    queue_url: str
    retry_queue_url: str
    dlq_url: str


def retry_queue_name(queue_name: str) -> str:
    return f'{queue_name}-retry'


@dataclass(frozen=True)
class QueueDepth:
    visible: int
    in_flight: int
    delayed: int


@dataclass(frozen=True)
class Received:
    queue_url: str  # the queue it came from (its receipt handle is valid only there)
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
    """Create (or bring up to date) the step queue, its retry queue and their dead-letter queue;
    safe to repeat."""

    async def ensure_all() -> QueueUrls:
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
        attributes: dict[QueueAttributeNameType, str] = {
            'VisibilityTimeout': str(settings.visibility_timeout_s),
            'RedrivePolicy': json.dumps(redrive),
        }
        return QueueUrls(
            queue_url=await _ensure_queue(client, settings.queue_name, attributes),
            retry_queue_url=await _ensure_queue(
                client, retry_queue_name(settings.queue_name), attributes
            ),
            dlq_url=dlq_url,
        )

    urls = await guarded_call(breaker, settings, 'bootstrap', ensure_all)
    log.info(
        'queues_ready',
        queue_url=urls.queue_url,
        retry_queue_url=urls.retry_queue_url,
        dlq_url=urls.dlq_url,
    )
    return urls


def _queue_missing(error: BaseException | None) -> bool:
    return (
        isinstance(error, botocore.exceptions.ClientError)
        and error.response.get('Error', {}).get('Code') in _MISSING_QUEUE_CODES
    )


def _string_attributes(attributes: Mapping[str, str | int]) -> dict[str, dict[str, str]]:
    return {
        name: {'DataType': 'String', 'StringValue': str(value)}
        for name, value in attributes.items()
    }


class SqsQueue:
    """The step queue, its retry queue and their dead-letter queue, every call guarded by one
    circuit breaker."""

    def __init__(
        self, client: SQSClient, urls: QueueUrls, settings: Settings, breaker: CircuitBreaker
    ) -> None:
        self.client = client
        self.urls = urls
        self.settings = settings
        self.breaker = breaker

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await guarded_call(self.breaker, self.settings, what, call)
        except TransportError as error:
            if _queue_missing(error.__cause__):
                raise QueueMissing(f'{what}: the queue does not exist any more: {error}') from error
            raise

    async def send(
        self, body: str, attributes: Mapping[str, str | int], retry: bool = False
    ) -> str:
        """Send a message to the step queue; its message id.

        A retry is sent twice: to the retry queue, which busy workers poll before the step queue,
        and to the step queue, where an idle worker's long poll sees it at once. The claim refuses
        whichever copy comes second. Its id is the retry queue copy's.
        """
        urls = [self.urls.retry_queue_url, self.urls.queue_url] if retry else [self.urls.queue_url]
        message_ids = [await self._send(queue_url, body, attributes) for queue_url in urls]
        return message_ids[0]

    async def _send(self, queue_url: str, body: str, attributes: Mapping[str, str | int]) -> str:
        response = await self._call(
            'send',
            lambda: self.client.send_message(
                QueueUrl=queue_url,
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
                queue_url=queue_url,
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
        """Up to `max_messages` (1 to 10) messages: retries first (a short poll of the retry
        queue), else a long poll of the step queue.

        An idle worker is in the step queue's long poll: a retry that arrives meanwhile waits
        for its end (`wait_s`). A short poll samples some of SQS's servers, so on AWS a retry may
        be seen a poll later.
        """
        visibility_timeout_s = visibility_timeout_s or self.settings.visibility_timeout_s
        retries = await self._receive(
            self.urls.retry_queue_url, max_messages, 0, visibility_timeout_s
        )
        if retries:
            return retries
        return await self._receive(self.urls.queue_url, max_messages, wait_s, visibility_timeout_s)

    async def delete(self, received: Received) -> None:
        await self._call(
            'delete',
            lambda: self.client.delete_message(
                QueueUrl=received.queue_url, ReceiptHandle=received.receipt_handle
            ),
        )

    async def change_visibility(self, received: Received, visibility_timeout_s: int) -> None:
        await self._call(
            'change_visibility',
            lambda: self.client.change_message_visibility(
                QueueUrl=received.queue_url,
                ReceiptHandle=received.receipt_handle,
                VisibilityTimeout=visibility_timeout_s,
            ),
        )

    async def _depth_of(self, queue_url: str) -> QueueDepth:
        response = await self._call(
            'depth',
            lambda: self.client.get_queue_attributes(
                QueueUrl=queue_url,
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

    async def depth(self) -> QueueDepth:
        """The step queue's and the retry queue's messages together (the workers' backlog)."""
        steps = await self._depth_of(self.urls.queue_url)
        retries = await self._depth_of(self.urls.retry_queue_url)
        return QueueDepth(
            visible=steps.visible + retries.visible,
            in_flight=steps.in_flight + retries.in_flight,
            delayed=steps.delayed + retries.delayed,
        )

    async def send_to_dlq(self, body: str, reason: str, attributes: Mapping[str, str | int]) -> str:
        """Move a message that cannot be processed to the dead-letter queue, with its reason."""
        reason = reason[:MAX_REASON_CHARS]
        message_id = await self._send(
            self.urls.dlq_url, body or '(empty)', {**attributes, 'reason': reason}
        )
        log.warning('message_dead_lettered', reason=reason, **attributes)
        return message_id

    async def peek_dlq(
        self, max_messages: int = MAX_RECEIVE_BATCH, wait_s: int = 0
    ) -> list[Received]:
        """Read the dead-letter queue (for reports and tests); the messages stay there."""
        return await self._receive(self.urls.dlq_url, max_messages, wait_s, visibility_timeout_s=0)


async def resolve_urls(client: SQSClient, settings: Settings, breaker: CircuitBreaker) -> QueueUrls:
    """URLs of the existing step queue (`queue_url`, else by `queue_name`), of its retry queue
    (named after it) and of its DLQ (its RedrivePolicy's)."""

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
        retry_name = retry_queue_name(queue_url.rstrip('/').rsplit('/', 1)[-1])
        retry_queue_url = (await client.get_queue_url(QueueName=retry_name))['QueueUrl']
        return QueueUrls(queue_url=queue_url, retry_queue_url=retry_queue_url, dlq_url=dlq_url)

    try:
        return await guarded_call(breaker, settings, 'resolve_urls', resolve)
    except TransportError as error:
        if not _queue_missing(error.__cause__):
            raise
        where = settings.aws_endpoint_url or f'AWS {settings.aws_region}'
        raise QueueMissing(
            f'{error} (queue {settings.queue_url or settings.queue_name} at {where}; '
            '`dagster-taskiq bootstrap` creates it)'
        ) from error


@asynccontextmanager
async def open_queue(settings: Settings) -> AsyncIterator[SqsQueue]:
    """The configured, existing queue ready to use (`dagster-taskiq bootstrap` creates it)."""
    breaker = CircuitBreaker.from_settings(settings)
    async with sqs_client(settings) as client:
        urls = await resolve_urls(client, settings, breaker)
        yield SqsQueue(client, urls, settings, breaker)


async def bootstrap_queues(settings: Settings) -> QueueUrls:
    """`bootstrap` on a client of its own (what `dagster-taskiq bootstrap` runs)."""
    async with sqs_client(settings) as client:
        return await bootstrap(client, settings, CircuitBreaker.from_settings(settings))
