"""The auto-scaler's pure policy, by example and by property."""

from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.autoscaler import Decision, Observation, Recommendation, ScalingPolicy, decide

POLICY = ScalingPolicy(
    min_workers=0, max_workers=10, target_backlog_per_worker=4, scale_down_stabilisation_s=60
)


def seen(
    at: float = 1000.0, visible: int = 0, in_flight: int = 0, delayed: int = 0, desired: int = 0
) -> Observation:
    return Observation(
        at=at,
        visible=visible,
        in_flight=in_flight,
        delayed=delayed,
        desired=desired,
        running=desired,
    )


def test_a_burst_scales_up_at_once() -> None:
    decision = decide(seen(visible=30, desired=1), [], POLICY)
    assert decision == Decision(desired=8, recommendation=8, reason='scale up: backlog asks for 8')


def test_scale_up_is_capped_per_step_and_by_max() -> None:
    capped = ScalingPolicy(max_workers=10, target_backlog_per_worker=1, max_step_up=3)
    assert decide(seen(visible=100, desired=2), [], capped).desired == 5
    assert decide(seen(visible=100, desired=9), [], capped).desired == 10


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    history = [Recommendation(at=950.0, workers=8)]
    held = decide(seen(at=1000.0, visible=4, desired=8), history, POLICY)
    assert (held.desired, held.recommendation) == (8, 1)
    assert held.reason.startswith('hold')
    later = decide(seen(at=1011.0, visible=4, desired=8), history, POLICY)
    assert later.desired == 1


def test_never_below_what_in_flight_work_needs() -> None:
    assert decide(seen(in_flight=12, desired=5), [], POLICY).desired == 3


def test_zero_is_left_only_at_the_activation_threshold() -> None:
    policy = ScalingPolicy(activation_threshold=5, target_backlog_per_worker=4)
    assert decide(seen(visible=4), [], policy).desired == 0
    assert decide(seen(visible=5), [], policy).desired == 2


def test_delayed_messages_keep_one_worker() -> None:
    assert decide(seen(delayed=3, desired=2), [], POLICY).desired == 1


policies = st.builds(
    lambda low, span, target, threshold: ScalingPolicy(
        min_workers=low,
        max_workers=max(1, low) + span - 1,
        target_backlog_per_worker=target,
        activation_threshold=threshold,
        scale_down_stabilisation_s=60,
    ),
    st.integers(0, 5),
    st.integers(1, 20),
    st.integers(1, 10),
    st.integers(1, 10),
)
counts = st.integers(0, 500)
histories = st.lists(
    st.builds(Recommendation, at=st.floats(900, 1000), workers=st.integers(0, 30)), max_size=5
)


@given(policies, counts, counts, counts, st.integers(0, 30), histories)
def test_desired_is_always_within_bounds(
    policy: ScalingPolicy,
    visible: int,
    in_flight: int,
    delayed: int,
    desired: int,
    history: list[Recommendation],
) -> None:
    decision = decide(
        seen(visible=visible, in_flight=in_flight, delayed=delayed, desired=desired),
        history,
        policy,
    )
    assert policy.min_workers <= decision.desired <= policy.max_workers


@given(policies, counts, counts, counts, st.integers(0, 30), histories)
def test_monotone_in_backlog(
    policy: ScalingPolicy,
    visible: int,
    extra: int,
    in_flight: int,
    desired: int,
    history: list[Recommendation],
) -> None:
    low = decide(seen(visible=visible, in_flight=in_flight, desired=desired), history, policy)
    high = decide(
        seen(visible=visible + extra, in_flight=in_flight, desired=desired), history, policy
    )
    assert high.desired >= low.desired


@given(policies, counts, counts, st.integers(0, 30))
def test_no_flapping_under_a_constant_backlog(
    policy: ScalingPolicy, visible: int, in_flight: int, start: int
) -> None:
    desired, history, changes = start, [], []
    for tick in range(40):
        observation = seen(
            at=1000.0 + 10 * tick, visible=visible, in_flight=in_flight, desired=desired
        )
        decision = decide(observation, history, policy)
        history.append(Recommendation(observation.at, decision.recommendation))
        if decision.desired != desired:
            changes.append(decision.desired)
        desired = decision.desired
    assert len(changes) <= 1  # it settles once and stays


@given(policies, counts, counts, counts, st.integers(1, 30), histories)
def test_reaches_zero_only_from_an_empty_queue(
    policy: ScalingPolicy,
    visible: int,
    in_flight: int,
    delayed: int,
    desired: int,
    history: list[Recommendation],
) -> None:
    decision = decide(
        seen(visible=visible, in_flight=in_flight, delayed=delayed, desired=desired),
        history,
        policy,
    )
    if decision.desired == 0:
        assert visible == in_flight == delayed == 0
