"""Retries with backoff and a circuit breaker, for every call that leaves the process.

`guarded_call` wraps an AWS call (SQS, ECS): transient errors (connection, timeout, throttling,
5xx) are retried with exponential backoff and full jitter (waits capped at 1, 2, 4, 8, 16 s by
default), and each failed try counts towards a `CircuitBreaker`, which opens after 5 consecutive
failures; an open breaker fails calls at once until its cool-down ends, then lets a probe through.
The store counts its database calls on a breaker of its own (`store.Store`). botocore is imported
where it is used: the store, and so every step process, needs only the breaker.
"""

import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from dagster_taskiq.errors import CircuitOpen, TransportError
from dagster_taskiq.logs import get_logger
from dagster_taskiq.settings import Settings

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig

T = TypeVar('T')
log = get_logger(__name__)

AWS_CONNECT_TIMEOUT_S = 5
AWS_READ_TIMEOUT_S = 30  # longer than SQS's longest long poll (20 s)
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

    @classmethod
    def from_settings(cls, settings: Settings) -> 'CircuitBreaker':
        return cls(settings.breaker_threshold, settings.breaker_cooldown_s)

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
    import botocore.exceptions

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
    import botocore.exceptions
    from tenacity import (
        AsyncRetrying,
        retry_if_exception,
        stop_after_attempt,
        wait_random_exponential,
    )

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


def aws_client_config() -> 'AioConfig':
    """botocore's own retries off (guarded_call retries), reads long enough for a long poll."""
    from aiobotocore.config import AioConfig

    return AioConfig(
        retries={'max_attempts': 1, 'mode': 'standard'},
        connect_timeout=AWS_CONNECT_TIMEOUT_S,
        read_timeout=AWS_READ_TIMEOUT_S,
    )
