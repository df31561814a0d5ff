"""A one-op job whose step args the message, worker and executor tests send (never executed)."""

from dagster import job, op, reconstructable
from dagster._core.execution.plan.state import KnownExecutionState
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs


@op
def noop() -> None:
    pass


@job
def one_op_job() -> None:
    noop()


def step_args(run_id: str, attempt: int = 0, step_key: str = 'noop') -> ExecuteStepArgs:
    return ExecuteStepArgs(
        job_origin=reconstructable(one_op_job).get_python_origin(),
        run_id=run_id,
        step_keys_to_execute=[step_key],
        retry_mode=RetryMode.ENABLED,
        known_state=KnownExecutionState(previous_retry_attempts={step_key: attempt}),
        should_verify_step=True,
    )
