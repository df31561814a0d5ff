"""Pieces of a local stack on one machine: databases, a Dagster home, worker processes.

Used by `dagster-taskiq-demo up`, the benchmarks and the end-to-end tests, so all three run the
same thing: real `dagster-taskiq worker` processes against PostgreSQL and the moto server.
"""

import os
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

POLL_S = 0.05
DEFAULT_WAIT_S = 30.0
WORKER_START_TIMEOUT_S = 90.0  # a cold start imports dagster twice: slow on a loaded 2-core box
WORKER_STOP_TIMEOUT_S = 60.0
DEFINITIONS_MODULE = 'dagster_taskiq_demo.definitions'
T = TypeVar('T')


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _admin_dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername='postgresql', query={}).render_as_string(False)


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url`; returns its URL."""
    with psycopg.connect(_admin_dsn(server_url), autocommit=True) as connection:
        connection.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
    return make_url(_admin_dsn(server_url)).set(database=name).render_as_string(False)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(_admin_dsn(server_url), autocommit=True) as connection:
        connection.execute(
            sql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)').format(sql.Identifier(name))
        )


TEMPLATES = Path(__file__).with_name('templates')


def write_dagster_home(home: Path, database_url: str) -> Path:
    """A DAGSTER_HOME whose run, event and schedule storage is PostgreSQL at `database_url`, with
    its tables created (workers refuse a database without them), from templates/dagster.yaml.

    The scheme is pinned to psycopg2: SQLAlchemy 2.1 maps `postgresql://` to psycopg 3, which
    dagster-postgres does not support.
    """
    from dagster import DagsterInstance

    home.mkdir(parents=True, exist_ok=True)
    dagster_url = make_url(database_url).set(drivername='postgresql+psycopg2')
    template = string.Template((TEMPLATES / 'dagster.yaml').read_text())
    postgres_url = dagster_url.render_as_string(hide_password=False)
    (home / 'dagster.yaml').write_text(template.substitute(postgres_url=postgres_url))
    DagsterInstance.from_config(str(home)).dispose()  # its storages create their tables
    return home


def write_workspace(folder: Path) -> Path:
    """The demo's workspace.yaml (templates/workspace.yaml) in `folder`; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'workspace.yaml'
    path.write_text((TEMPLATES / 'workspace.yaml').read_text())
    return path


@dataclass
class WorkerProcess:
    worker_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def started(self) -> bool:
        """Whether the worker is serving; raises if it exited while starting."""
        if self.process.poll() is not None:
            raise RuntimeError(f'worker {self.worker_id} exited while starting:\n{self.log()}')
        return 'worker_started' in self.log()

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int:
        """SIGTERM (the worker drains), then SIGKILL after `timeout_s`; returns the exit code."""
        return stop_process(self.process, timeout_s)


def spawn_worker(
    worker_id: str,
    log_dir: Path,
    *args: str,
    preload: tuple[str, ...] = (DEFINITIONS_MODULE,),
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start `dagster-taskiq worker` (with `args`), logging to `<log_dir>/<worker_id>.log`."""
    log_path = log_dir / f'{worker_id}.log'
    command = [
        str(Path(sys.executable).with_name('dagster-taskiq')),
        'worker',
        '--worker-id',
        worker_id,
        '--journal-dir',
        str(log_dir / 'journal'),
        *(option for module in preload for option in ('--preload', module)),
        *args,
    ]
    with log_path.open('wb') as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return WorkerProcess(worker_id, process, log_path)


def wait_for(
    condition: Callable[[], T], timeout_s: float = DEFAULT_WAIT_S, what: str = 'condition'
) -> T:
    """Poll `condition` until it returns something truthy (returned); TimeoutError at the deadline.

    The one polling loop of the stack, its tests and benchmarks: nothing waits by sleeping.
    """
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f'{what} not met within {timeout_s} s')
        time.sleep(POLL_S)
    return result


def wait_started(workers: list[WorkerProcess], timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
    """Wait until every worker has warmed its step processes and is receiving."""
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        left_s = max(0.0, deadline - time.monotonic())
        wait_for(worker.started, left_s, f'worker {worker.worker_id} serving')
