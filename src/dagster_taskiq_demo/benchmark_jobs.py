"""The benchmark's jobs: the same graphs on every executor a user would compare.

`<graph>__<executor>` for each graph (a 20-op chain, a 50-op fan-out/fan-in) and each executor
(in_process, multiprocess, taskiq). Workers import this module to run the taskiq variants.
"""

from dagster import (
    Definitions,
    DynamicOut,
    DynamicOutput,
    ExecutorDefinition,
    FilesystemIOManager,
    graph,
    in_process_executor,
    multiprocess_executor,
    op,
)

from dagster_taskiq.executor import taskiq_executor

CHAIN_LENGTH = 20
FAN_OUT_WIDTH = 50
EXECUTORS: dict[str, ExecutorDefinition] = {
    'in_process': in_process_executor,
    'multiprocess': multiprocess_executor,
    'taskiq': taskiq_executor,
}


@op
def start() -> int:
    return 0


@op
def increment(value: int) -> int:
    return value + 1


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


GRAPHS = {'chain': chain, 'fan_out': fan_out}

defs = Definitions(
    jobs=[
        graph_def.to_job(name=f'{graph_name}__{executor_name}', executor_def=executor_def)
        for graph_name, graph_def in GRAPHS.items()
        for executor_name, executor_def in EXECUTORS.items()
    ],
    resources={'io_manager': FilesystemIOManager()},
)
