"""The worker's side of step processes: start one per attempt, wait for its outcome, stop it.

The worker sees only `StepRunner` and `StepRun`. `ForkserverStepRunner` forks each step from a warm
forkserver that has already imported dagster and the code location (~15 ms a step, against ~3.7 s
for a fresh `dagster api execute_step`): a cancel is a signal, a crash in user code kills only its
process, and the worker's event loop keeps heartbeating. Never fork the worker itself: it runs an
event loop and threads. What runs inside the step process is `step_process.run_step`.

The process of the next step is started ahead, as a spare: when a step starts, the runner forks
the next one, which connects to the storages and waits for its step's arguments, so a claimed
attempt starts without a fork or a connect. Each spare runs one step at most; one no step came
for within SPARE_IDLE_S is retired.
"""

import asyncio
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from dagster_taskiq.errors import ConfigError
from dagster_taskiq.message import OpExecutionTask
from dagster_taskiq.step_process import StepOutcome, report_failed_imports, run_step

SPARE_IDLE_S = 30.0  # a spare step process no step came for exits after this long

# Modules Dagster imports lazily while it executes a step (~25 ms a step when not preloaded);
# the forkserver skips a name it cannot import, so a Dagster release that moves one costs only time
DAGSTER_STEP_MODULES = (
    'dagster._core.storage.sqlite_storage',
    'dagster._core.system_config.composite_descent',
    'dagster._core.utility_ops',
    'dagster._core.workspace.autodiscovery',
    'dagster._utils.temp_file',
    'dagster._utils.test.definitions',
)


class StepRun(Protocol):
    """One attempt's user code, running where the worker can stop it."""

    @property
    def pid(self) -> int | None: ...

    async def outcome(self) -> StepOutcome:
        """Wait until the step has ended; what it reported, or why it reported nothing."""
        ...

    def extend(self, seconds: float) -> None:
        """The step must end by itself unless extended again within `seconds` (its self-guard:
        a frozen or cut-off worker cannot leave it running past its lease)."""
        ...

    def interrupt(self) -> None:
        """Ask the step to stop (Dagster's interrupt handling records it)."""
        ...

    def kill(self) -> None:
        """Stop the step, and whatever its user code started, at once; it writes nothing more."""
        ...


class StepRunner(Protocol):
    async def start(self) -> None:
        """Get ready to run steps (the forkserver imports dagster once, here)."""
        ...

    async def ready(self) -> None:
        """Be able to start a step at once (before an attempt is claimed, whose lease runs)."""
        ...

    async def run(self, task: OpExecutionTask) -> StepRun: ...

    def close(self) -> None:
        """Stop what `run` keeps ready for the next step (after the last step has started)."""
        ...


async def _readable(*handles: int) -> None:
    """Wait until one of the file descriptors (a pipe, a process sentinel) is readable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def mark_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    for handle in handles:
        loop.add_reader(handle, mark_ready)
    try:
        await ready
    finally:
        for handle in handles:
            loop.remove_reader(handle)


def _received(reader: Connection) -> Any:
    """What the process sent on the pipe, or None when it died before sending all of it."""
    try:
        return reader.recv() if reader.poll() else None
    except (EOFError, OSError):  # OSError: end of file in the middle of the message
        return None


def _forkserver_restarted() -> bool:
    """Whether the forkserver had died and was started again (multiprocessing tells only through
    its forkserver's pid: a private attribute)."""
    server = multiprocessing.forkserver._forkserver
    before = server._forkserver_pid  # type: ignore[attr-defined]
    server.ensure_running()
    return bool(server._forkserver_pid != before)  # type: ignore[attr-defined]


class ProcessStepRun:
    def __init__(self, process: BaseProcess, reader: Connection, keep_alive: Connection) -> None:
        self.process = process
        self.reader = reader
        # the lifeline's sending end: deadline extensions go through it, and its closing (our
        # exit, even SIGKILL) kills the step process group
        self.keep_alive = keep_alive

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def outcome(self) -> StepOutcome:
        """Read the outcome while the process is alive (a large one would not fit the pipe's
        buffer and block its exit), then wait for the exit.

        The end is learnt from the outcome pipe, whose sending end only the step process holds
        (end of file: it has exited), not from the process sentinel: a forkserver's child
        reports its exit through the forkserver, and a forkserver that died would make every
        running step look dead.
        """
        try:
            await _readable(self.reader.fileno())
            sent: StepOutcome | None = await asyncio.to_thread(_received, self.reader)
            if self.process.is_alive():
                await _readable(self.process.sentinel)
            self.process.join()
        finally:
            self.reader.close()
            self.keep_alive.close()
        return sent or StepOutcome(error=f'step process exited with code {self.process.exitcode}')

    def extend(self, seconds: float) -> None:
        with contextlib.suppress(OSError):  # the step process has ended: nothing to extend
            self.keep_alive.send(seconds)

    def interrupt(self) -> None:
        if self.process.is_alive():
            self.process.terminate()

    def kill(self) -> None:
        if self.process.pid is None or not self.process.is_alive():
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet the leader of its own group (it has just started)
            self.process.kill()


@dataclass
class SpareStep:
    """A step process started ahead of its step, waiting for it on `step_args`."""

    run: ProcessStepRun
    step_args: Connection
    retire_timer: asyncio.TimerHandle | None = None


class ForkserverStepRunner:
    """Step processes forked from a forkserver that imported dagster and `preload` once.

    Every child re-runs the worker's main script (Python 3.11's forkserver ignores '__main__' in
    the preload list), so the CLI it imports is preloaded: the re-run then costs ~1 ms. The CLI
    module imports nothing at the top beyond click, so the forkserver (and every step process)
    holds only what a step needs: dagster, the step process module and the code location. Last,
    `warm_step_process` builds the Dagster instance of DAGSTER_HOME once, so steps reuse it.
    """

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.user_modules = list(preload)
        self.preload = [
            'dagster',
            'dagster_postgres',
            *DAGSTER_STEP_MODULES,
            'dagster_taskiq.cli',
            'dagster_taskiq.step_process',
            *preload,
            'dagster_taskiq.warm_step_process',
        ]
        self.context: ForkServerContext = multiprocessing.get_context('forkserver')
        self.spare: SpareStep | None = None
        self.refilling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the forkserver now (it imports dagster once), not on the first step; a preload
        module that cannot be imported is a ConfigError naming it."""
        self.context.set_forkserver_preload(self.preload)
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=report_failed_imports, args=(self.user_modules, writer), name='warm-up'
        )
        process.start()
        writer.close()
        await _readable(process.sentinel)
        process.join()
        failed = _received(reader)
        reader.close()
        if failed is None:
            raise ConfigError(f'the step process parent failed to start (exit {process.exitcode})')
        if failed:
            raise ConfigError(f'--preload module cannot be imported: {"; ".join(failed)}')

    async def ready(self) -> None:
        """Start the forkserver again if it died, and wait until it serves (its preload takes
        seconds), off the event loop and before the claim, whose lease would run out meanwhile."""
        if await asyncio.to_thread(_forkserver_restarted):
            await self.start()

    async def run(self, task: OpExecutionTask) -> ProcessStepRun:
        """Hand the step to the spare process (or, with none ready, to a new one), then start
        the next spare, ready for the run's next step, off the claim-to-start path."""
        spare, self.spare = self.spare, None
        if spare is not None and not spare.run.process.is_alive():
            self._retire_spare(spare)
            spare = None
        if spare is None:
            spare = await self._start_spare(task.run_id)
        if spare.retire_timer is not None:
            spare.retire_timer.cancel()
        # if it died since, the outcome says how, and the attempt fails as it would have
        with contextlib.suppress(OSError):
            spare.step_args.send(task.execute_step_args)
        spare.step_args.close()
        self.refilling = asyncio.create_task(self._refill(task.run_id, self.refilling))
        return spare.run

    async def _start_spare(self, run_id: str | None) -> SpareStep:
        step_args, args_sender = self.context.Pipe(duplex=False)
        reader, writer = self.context.Pipe(duplex=False)
        lifeline, keep_alive = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_step, args=(step_args, writer, lifeline, run_id), name='step'
        )
        # off the event loop: a forkserver that died is started again here, preload and all
        await asyncio.to_thread(process.start)
        for end in (step_args, writer, lifeline):  # the step process holds these ends now
            end.close()
        spare = SpareStep(ProcessStepRun(process, reader, keep_alive), args_sender)
        spare.retire_timer = asyncio.get_running_loop().call_later(
            SPARE_IDLE_S, self._retire_spare, spare
        )
        return spare

    async def _refill(self, run_id: str, previous: 'asyncio.Task[None] | None') -> None:
        if previous is not None:  # one start at a time: steps starting together need one spare
            await asyncio.gather(previous, return_exceptions=True)
        if self.spare is None:
            self.spare = await self._start_spare(run_id)

    def close(self) -> None:
        if self.refilling is not None:
            self.refilling.cancel()
        if self.spare is not None:
            self._retire_spare(self.spare)

    def _retire_spare(self, spare: SpareStep) -> None:
        """Close the spare's pipes: it exits (its connections with it). An idle worker holds no
        database connection for longer than SPARE_IDLE_S."""
        if self.spare is spare:
            self.spare = None
        if spare.retire_timer is not None:
            spare.retire_timer.cancel()
        for end in (spare.step_args, spare.run.reader, spare.run.keep_alive):
            end.close()
