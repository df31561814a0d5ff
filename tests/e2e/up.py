"""`dagster-taskiq-demo up` as a user starts it (a process of its own), for the tests that need
the whole local stack."""

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dagster_taskiq_demo.emulator import free_port
from dagster_taskiq_demo.stack import create_database, drop_database
from tests.conftest import BASE_DATABASE_URL
from tests.waiting import wait_until

UP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 180.0


def children(pid: int) -> set[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, int] = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / 'stat').read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(')', 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return state != 'Z'


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path
    database_url: str
    web_url: str
    ports: tuple[int, ...]

    def text(self) -> str:
        return self.output.read_text(errors='replace')


def demo_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name('dagster-taskiq-demo')), *args]


def ops(up: 'Up', *args: str) -> str:
    """An operations command against the stack, with --json: its output."""
    done = subprocess.run(
        demo_command(*args, '--data-dir', str(up.data_dir), '--json'),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


@contextmanager
def running_up(
    folder: Path, *args: str, env: dict[str, str] | None = None, private_postgres: bool = False
) -> Iterator[Up]:
    """`dagster-taskiq-demo up` (with `args`) on a database of its own (`private_postgres`: on
    a PostgreSQL of its own, so `folder` must be one its `postgres` user can reach) and free
    ports, once it has printed its summary; stopped (SIGTERM, then SIGKILL) after, and its
    database dropped."""
    name = f'stack_{uuid.uuid4().hex[:10]}'
    database_url = '' if private_postgres else create_database(BASE_DATABASE_URL, name)
    moto_port, web_port = free_port(), free_port()
    output = folder / 'up.out'
    environment = {**os.environ, **(env or {}), 'DATABASE_URL': database_url, 'COLUMNS': '200'}
    if private_postgres:
        environment.pop('DATABASE_URL')
        args = (*args, '--private-postgres')
    with output.open('wb') as out:
        process = subprocess.Popen(
            demo_command(
                'up',
                *('--data-dir', str(folder / 'data'), '--env', 'e2e', '--max-workers', '2'),
                *('--moto-port', str(moto_port), '--webserver-port', str(web_port), *args),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    started = Up(
        process,
        output,
        folder / 'data',
        database_url,
        f'http://127.0.0.1:{web_port}',
        (moto_port, web_port),
    )
    try:

        def summary_printed() -> bool:
            if process.poll() is not None:
                raise AssertionError(f'up exited with {process.returncode}:\n{started.text()}')
            return 'Ctrl-C stops everything' in started.text()

        wait_until(summary_printed, timeout_s=UP_TIMEOUT_S, what='the stack up')
        if private_postgres:
            found = re.search(r'Database (postgresql://\S+);', started.text())
            assert found, started.text()
            started.database_url = found[1]
        yield started
    finally:
        if process.poll() is None:  # a test that failed before stopping it: leave nothing behind
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not private_postgres:
            drop_database(BASE_DATABASE_URL, name)
