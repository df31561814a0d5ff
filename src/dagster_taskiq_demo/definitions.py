"""Demo jobs, every one on `taskiq_executor`.

Every job sets `op_retry_policy`: when a worker is lost mid-step, Dagster retries the step as a new
attempt only for ops with a RetryPolicy (without one, the step fails naming the lost worker).
Step outputs go through the IO manager: a folder shared by the local workers, or S3 when
`DAGSTER_TASKIQ_DEMO_S3_BUCKET` is set (with `DAGSTER_TASKIQ_DEMO_S3_ENDPOINT_URL` for moto).
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from dagster import (
    Config,
    Definitions,
    DynamicOut,
    DynamicOutput,
    FilesystemIOManager,
    In,
    Nothing,
    OpExecutionContext,
    RetryPolicy,
    job,
    op,
)
from dagster_aws.s3 import S3PickleIOManager, S3Resource

from dagster_taskiq import record_effect, taskiq_executor

RETRY_POLICY = RetryPolicy(max_retries=2)
FAN_OUT_WIDTH = 12


def demo_io_manager() -> FilesystemIOManager | S3PickleIOManager:
    bucket = os.environ.get('DAGSTER_TASKIQ_DEMO_S3_BUCKET')
    if not bucket:
        return FilesystemIOManager()  # under DAGSTER_HOME: a folder every local worker shares
    endpoint_url = os.environ.get('DAGSTER_TASKIQ_DEMO_S3_ENDPOINT_URL')
    return S3PickleIOManager(
        s3_resource=S3Resource(endpoint_url=endpoint_url), s3_bucket=bucket, s3_prefix='demo'
    )


@op
def ping() -> int:
    print(f'ping from worker {os.environ.get("DAGSTER_TASKIQ_WORKER_ID", "(none)")}')
    return 1


@op
def add_one(value: int) -> int:
    return value + 1


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def fast_job() -> None:
    """Three millisecond ops in a chain."""
    add_one(add_one(ping()))


class SleepConfig(Config):
    seconds: float = 2.0


@op
def sleep_then_return(config: SleepConfig) -> int:
    time.sleep(config.seconds)
    return round(config.seconds * 1000)


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def slow_job() -> None:
    """One op that sleeps `seconds` (run config), then one that follows it."""
    add_one(sleep_then_return())


class SplitConfig(Config):
    width: int = FAN_OUT_WIDTH


@op(out=DynamicOut(int))
def split(config: SplitConfig) -> object:
    for index in range(config.width):
        yield DynamicOutput(index, mapping_key=f'k{index}')


class SquareConfig(Config):
    seconds: float = 0.0  # how long each square takes


@op
def square(config: SquareConfig, value: int) -> int:
    time.sleep(config.seconds)
    return value * value


@op
def total(values: list[int]) -> int:
    return sum(values)


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def fan_out_job() -> None:
    """`width` (run config; `FAN_OUT_WIDTH`) parallel ops (step keys like `square[k3]`) and one
    that collects them."""
    total(split().map(square).collect())


class DemoFailure(Exception):
    """Raised by the demo's failing ops."""


@op
def always_fails() -> None:
    raise DemoFailure('this op always fails')


@job(executor_def=taskiq_executor)
def failing_job() -> None:
    """One op that raises; no RetryPolicy, so the run fails."""
    always_fails()


@op(retry_policy=RetryPolicy(max_retries=3))
def fails_first_time(context: OpExecutionContext) -> int:
    if context.retry_number == 0:
        raise DemoFailure('transient failure on the first attempt')
    return context.retry_number


@job(executor_def=taskiq_executor)
def flaky_job() -> None:
    """An op that fails its first attempt and succeeds on the retry."""
    add_one(fails_first_time())


@op
def crashes_first_time(context: OpExecutionContext) -> int:
    if context.retry_number == 0:
        os._exit(3)  # the step process dies without a word to Dagster; only it, not the worker
    return context.retry_number


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def crashing_job() -> None:
    """Its op's first attempt kills its own process; the health check sees it, Dagster retries."""
    add_one(crashes_first_time())


# The demo's own record of when each attempt's user code ran (outside the store and Dagster), so a
# test or `verify` can prove two attempts of one step never ran at once. A killed attempt has no
# `ended_at`: it died at most ALIVE_INTERVAL_S after its last `alive_at`.
ALIVE_INTERVAL_S = 0.1
# Each row also names the worker that ran the attempt (DAGSTER_TASKIQ_WORKER_ID, set by the worker).
OP_RUNS_TABLE = """
CREATE TABLE IF NOT EXISTS demo_op_runs (
  run_id text NOT NULL, step_key text NOT NULL, attempt int NOT NULL, pid int NOT NULL,
  child_pid int, begun_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  alive_at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz, worker text
);
ALTER TABLE demo_op_runs ADD COLUMN IF NOT EXISTS worker text"""


@contextmanager
def recorded_op_run(
    context: OpExecutionContext, child_pid: int | None = None
) -> Iterator[Callable[[], None]]:
    """Record in `demo_op_runs` that this attempt's user code began, and, when the block ends
    without an error, that it ended; the block may call what it is given to say it is alive."""
    with psycopg.connect(os.environ['DATABASE_URL'], autocommit=True) as connection:
        has_table = connection.execute(  # ALTER TABLE locks it exclusively: only when needed
            "SELECT 1 FROM information_schema.columns WHERE table_name = 'demo_op_runs'"
            " AND column_name = 'worker' AND table_schema = current_schema()"
        ).fetchone()
        if has_table is None:
            with connection.transaction():  # one at a time: concurrent CREATEs can clash
                connection.execute("SELECT pg_advisory_xact_lock(hashtext('demo_op_runs'))")
                connection.execute(OP_RUNS_TABLE)
        key = (context.run_id, context.get_step_execution_context().step.key, context.retry_number)
        connection.execute(
            'INSERT INTO demo_op_runs (run_id, step_key, attempt, pid, child_pid, worker)'
            ' VALUES (%s, %s, %s, %s, %s, %s)',
            (*key, os.getpid(), child_pid, os.environ.get('DAGSTER_TASKIQ_WORKER_ID')),
        )

        def alive() -> None:
            connection.execute(
                'UPDATE demo_op_runs SET alive_at = clock_timestamp()'
                ' WHERE run_id = %s AND step_key = %s AND attempt = %s',
                key,
            )

        yield alive
        connection.execute(
            'UPDATE demo_op_runs SET ended_at = clock_timestamp()'
            ' WHERE run_id = %s AND step_key = %s AND attempt = %s',
            key,
        )


@op
def write_effect(context: OpExecutionContext) -> None:
    with recorded_op_run(context):  # what a user's external side effect would see
        record_effect('row', {'step_key': str(context.op_handle), 'run_id': context.run_id})


@op(ins={'after': In(Nothing)})
def write_effect_after(context: OpExecutionContext) -> None:
    with recorded_op_run(context):
        record_effect('row', {'step_key': str(context.op_handle), 'run_id': context.run_id})


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def side_effect_job() -> None:
    """Ops whose effects are written with the attempt's completion (the transactional outbox),
    each also recording when it ran (`demo_op_runs`), as a user's external side effect would."""
    first = write_effect.alias('effect_a')()
    write_effect_after.alias('effect_b')(first)
    write_effect.alias('effect_c')()


class RecordedConfig(Config):
    seconds: float = 5.0
    retry_seconds: float | None = None  # how long a retry sleeps; None: `seconds`
    with_child: bool = False  # also start a child process (`sleep`) and record its pid


@op
def recorded_sleep(context: OpExecutionContext, config: RecordedConfig) -> int:
    """Sleep `seconds`, recording in `demo_op_runs` when this attempt began, lived and ended."""
    import subprocess

    child = subprocess.Popen(['sleep', str(config.seconds + 60)]) if config.with_child else None
    with recorded_op_run(context, child.pid if child else None) as alive:
        seconds = config.seconds if context.retry_number == 0 else config.retry_seconds
        deadline = time.monotonic() + (config.seconds if seconds is None else seconds)
        while time.monotonic() < deadline:
            time.sleep(ALIVE_INTERVAL_S)
            alive()
        if child is not None:
            child.kill()
            child.wait()
    record_effect('recorded', {'attempt': context.retry_number})  # kept only if it completes
    return context.retry_number


@job(executor_def=taskiq_executor, op_retry_policy=RETRY_POLICY)
def recorded_job() -> None:
    """One op that records its own begin, liveness and end (`demo_op_runs`), then one after it."""
    add_one(recorded_sleep())


defs = Definitions(
    jobs=[
        fast_job,
        slow_job,
        fan_out_job,
        failing_job,
        flaky_job,
        crashing_job,
        side_effect_job,
        recorded_job,
    ],
    resources={'io_manager': demo_io_manager()},
)
