"""The worker's side of a step process, with real processes: outcomes of any size arrive."""

import multiprocessing
from multiprocessing.connection import Connection

from dagster_taskiq.step_process import StepOutcome
from dagster_taskiq.step_runner import ProcessStepRun

BIG_EFFECT_BYTES = 1_000_000  # far beyond a pipe's buffer (64 KiB)


def send_big_outcome(result: Connection) -> None:
    result.send(
        StepOutcome(succeeded=True, effects=[{'name': 'blob', 'payload': 'x' * BIG_EFFECT_BYTES}])
    )
    result.close()


def exit_without_a_word(result: Connection) -> None:
    raise SystemExit(3)


def started(target: object) -> ProcessStepRun:
    context = multiprocessing.get_context('spawn')
    reader, writer = context.Pipe(duplex=False)
    _, keep_alive = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(writer,))
    process.start()
    writer.close()
    return ProcessStepRun(process, reader, keep_alive)


async def test_an_outcome_larger_than_the_pipe_buffer_arrives() -> None:
    outcome = await started(send_big_outcome).outcome()
    assert outcome.succeeded
    assert len(outcome.effects[0]['payload']) == BIG_EFFECT_BYTES


async def test_a_process_that_dies_without_a_word_says_how_it_exited() -> None:
    outcome = await started(exit_without_a_word).outcome()
    assert not outcome.succeeded
    assert outcome.error == 'step process exited with code 3'
