"""The circuit breaker's states, on a clock the test moves."""

import pytest

from dagster_taskiq.errors import CircuitOpen
from dagster_taskiq.resilience import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=5, cooldown_s=30, clock=clock)
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_success()
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # the success reset the count
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match='circuit open after 5 consecutive failures'):
        breaker.check('send')


def test_half_opens_after_cooldown_and_a_probe_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=30, clock=clock)
    breaker.record_failure()
    clock.now += 29.9
    assert breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_probe() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.check('probe')  # lets the probe through
    breaker.record_failure()  # a failed probe opens it again for a full cool-down
    assert breaker.state is BreakerState.OPEN
    clock.now += 30
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
