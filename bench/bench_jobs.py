"""The benchmarks' jobs: the same graphs on every executor a user would compare.

`<graph>__<executor>` for each graph and executor (in_process, multiprocess, mp_forkserver,
celery, taskiq); multiprocess and mp_forkserver are the same executor, which bench/executors.py
configures with spawn and with forkserver. Taskiq and Celery workers import this module (the
benchmarks put bench/ on PYTHONPATH), and so does mp_forkserver's forkserver.
"""

import time

from dagster import (
    Definitions,
    DynamicOut,
    DynamicOutput,
    ExecutorDefinition,
    FilesystemIOManager,
    GraphDefinition,
    OpDefinition,
    graph,
    in_process_executor,
    multiprocess_executor,
    op,
)
from dagster_celery import celery_executor

from dagster_taskiq.executor import taskiq_executor

CHAIN_LENGTH = 20
FAN_OUT_WIDTH = 50
MANY_WIDTH = 10  # independent 10 ms ops in one run of `many`
NOOP_WIDTH = 60  # independent no-op ops in one run of `noop_wide` (the dispatch backlog)
SLEEP_S = 0.01
MEMORY_STEPS = 4  # parallel ops of `sleepy`, each sleeping MEMORY_STEP_S (bench/memory.py)
MEMORY_STEP_S = 5.0
EXECUTORS: dict[str, ExecutorDefinition] = {
    'in_process': in_process_executor,
    'multiprocess': multiprocess_executor,
    'mp_forkserver': multiprocess_executor,
    'celery': celery_executor,
    'taskiq': taskiq_executor,
}


@op
def start() -> int:
    return 0


@op
def increment(value: int) -> int:
    return value + 1


@op
def nap() -> None:
    time.sleep(SLEEP_S)


@op
def noop() -> None:
    pass


@graph
def chain() -> None:
    value = start()
    for _ in range(CHAIN_LENGTH - 1):
        value = increment(value)


@op(out=DynamicOut(int))
def spread() -> object:
    for index in range(FAN_OUT_WIDTH):
        yield DynamicOutput(index, mapping_key=f'k{index}')


@op
def gather(values: list[int]) -> int:
    return sum(values)


@graph
def fan_out() -> None:
    gather(spread().map(increment).collect())


@op
def doze() -> None:
    time.sleep(MEMORY_STEP_S)


def side_by_side(name: str, op_def: OpDefinition, width: int) -> GraphDefinition:
    """`width` copies of `op_def` with no dependencies between them: all may run at once."""

    @graph(name=name)
    def copies() -> None:
        for index in range(width):
            op_def.alias(f'{op_def.name}_{index}')()

    return copies


many = side_by_side('many', nap, MANY_WIDTH)
noop_wide = side_by_side('noop_wide', noop, NOOP_WIDTH)
noop_100 = side_by_side('noop_100', noop, 100)
sleepy = side_by_side('sleepy', doze, MEMORY_STEPS)


@graph
def noop_one() -> None:
    noop()


GRAPHS: dict[str, GraphDefinition] = {'chain': chain, 'fan_out': fan_out, 'many': many}
STEPS = {'chain': CHAIN_LENGTH, 'fan_out': FAN_OUT_WIDTH + 2, 'many': MANY_WIDTH}

defs = Definitions(
    jobs=[
        *(
            graph_def.to_job(name=f'{graph_name}__{executor_name}', executor_def=executor_def)
            for graph_name, graph_def in GRAPHS.items()
            for executor_name, executor_def in EXECUTORS.items()
        ),
        # bench/dispatch.py: one no-op step per run (idle latency), many at once (backlog)
        noop_one.to_job(name='noop_one__taskiq', executor_def=taskiq_executor),
        noop_wide.to_job(name='noop_wide__taskiq', executor_def=taskiq_executor),
        # bench/scale.py: runs whose executor enqueues 100 steps at once
        noop_100.to_job(name='noop_100__taskiq', executor_def=taskiq_executor),
        # bench/memory.py: a worker running MEMORY_STEPS steps at once
        sleepy.to_job(name='sleepy__taskiq', executor_def=taskiq_executor),
    ],
    resources={'io_manager': FilesystemIOManager()},
)
