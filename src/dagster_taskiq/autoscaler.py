"""The auto-scaler: a pure policy from queue depth to a desired worker count, and its loop.

`decide` is a pure function of its inputs. The loop reads the queue's depth and the ECS service's
counts each poll, asks `decide`, writes `UpdateService(desiredCount)` when the count changes and
records every decision in `scaling_events`. The same code runs against AWS and the emulator.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MIN_WORKERS = 0
DEFAULT_MAX_WORKERS = 10
DEFAULT_TARGET_BACKLOG_PER_WORKER = 4
DEFAULT_POLL_INTERVAL_S = 5.0
DEFAULT_SCALE_DOWN_STABILISATION_S = 60.0
DEFAULT_ACTIVATION_THRESHOLD = 1


@dataclass(frozen=True)
class ScalingPolicy:
    min_workers: int = DEFAULT_MIN_WORKERS
    max_workers: int = DEFAULT_MAX_WORKERS
    target_backlog_per_worker: int = DEFAULT_TARGET_BACKLOG_PER_WORKER
    scale_down_stabilisation_s: float = DEFAULT_SCALE_DOWN_STABILISATION_S
    activation_threshold: int = DEFAULT_ACTIVATION_THRESHOLD
    max_step_up: int | None = None  # most workers added by one decision; None: no cap

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(
                f'need 0 <= min <= max and max >= 1, got {self.min_workers}, {self.max_workers}'
            )
        if self.target_backlog_per_worker < 1 or self.activation_threshold < 1:
            raise ValueError('target_backlog_per_worker and activation_threshold must be >= 1')
        if self.max_step_up is not None and self.max_step_up < 1:
            raise ValueError('max_step_up must be >= 1')


@dataclass(frozen=True)
class Observation:
    """What the loop saw at `at` (seconds): the queue's depth and the service's counts."""

    at: float
    visible: int
    in_flight: int
    delayed: int
    desired: int
    running: int


@dataclass(frozen=True)
class Recommendation:
    at: float
    workers: int


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: int  # what the backlog alone asks for; the loop keeps these as history
    reason: str


def _clamp(value: int, policy: ScalingPolicy) -> int:
    return max(policy.min_workers, min(policy.max_workers, value))


def recommend(observation: Observation, policy: ScalingPolicy) -> int:
    """Workers the backlog asks for: ceil((visible + in_flight) / target), within [min, max].

    From zero, the visible messages must reach the activation threshold first.
    """
    idle = observation.desired == 0 and observation.in_flight == 0
    if idle and observation.visible < policy.activation_threshold:
        return policy.min_workers
    backlog = observation.visible + observation.in_flight
    wanted = math.ceil(backlog / policy.target_backlog_per_worker)
    if wanted == 0 and observation.delayed > 0:
        wanted = 1  # a delayed message is work that is coming: do not scale to zero under it
    return _clamp(wanted, policy)


def decide(
    observation: Observation, history: Sequence[Recommendation], policy: ScalingPolicy
) -> Decision:
    """The desired worker count: up at once (capped by max_step_up), down only when no higher
    recommendation was made within the stabilisation window, never below in-flight work's need."""
    current = observation.desired
    recommendation = recommend(observation, policy)
    if recommendation > current:
        step = recommendation if policy.max_step_up is None else current + policy.max_step_up
        desired = _clamp(min(recommendation, step), policy)
        return Decision(desired, recommendation, f'scale up: backlog asks for {recommendation}')
    if recommendation == current:
        return Decision(_clamp(current, policy), recommendation, 'steady')
    window_start = observation.at - policy.scale_down_stabilisation_s
    recent = [r.workers for r in history if r.at > window_start]
    highest = max([recommendation, *recent])
    in_flight_need = _clamp(
        math.ceil(observation.in_flight / policy.target_backlog_per_worker), policy
    )
    desired = _clamp(min(current, max(highest, in_flight_need)), policy)
    if desired == current:
        reason = f'hold: {highest} recommended within {policy.scale_down_stabilisation_s:.0f} s'
    else:
        reason = f'scale down: highest recommendation in the window is {highest}'
    return Decision(desired, recommendation, reason)
