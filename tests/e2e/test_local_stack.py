"""The local platform as a user starts it: `dagster-taskiq-demo up` in a process of its own."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dagster import DagsterRunStatus

from dagster_taskiq_demo.emulator import free_port
from dagster_taskiq_demo.local_stack import (
    LocalStack,
    StackOptions,
    group_alive,
    pgserver_bin_dir,
    port_in_use,
    postgres_bin_dir,
)
from dagster_taskiq_demo.runs import graphql_client, submit, wait_ended
from tests.e2e.up import (
    STOP_TIMEOUT_S,
    UP_TIMEOUT_S,
    Up,
    alive,
    children,
    demo_command,
    ops,
    running_up,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a whole stack starts and stops
REPOSITORY = Path(__file__).parents[2]
ARTIFACTS = REPOSITORY / 'build' / 'test-artifacts'
RUN_TIMEOUT_S = 240.0


@pytest.fixture(scope='module')
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp('stack')) as started:
        yield started


def assert_stops_cleanly(up: Up) -> None:
    """SIGTERM: exit 0, every process it started gone, its ports free."""
    started = children(up.process.pid)
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=STOP_TIMEOUT_S) == 0, up.text()
    assert [pid for pid in started if alive(pid)] == []
    assert not any(group_alive(pid) for pid in started)
    assert not any(port_in_use(port) for port in up.ports)


def test_a_job_submitted_through_the_api_runs_on_a_worker_the_scaler_started(up: Up) -> None:
    client = graphql_client(up.web_url)
    run_id = submit(client, 'fast_job', {})
    assert wait_ended(client, [run_id], RUN_TIMEOUT_S) == {run_id: DagsterRunStatus.SUCCESS}
    with psycopg.connect(up.database_url) as connection:
        owners = {
            row[0]
            for row in connection.execute(
                'SELECT owner FROM step_executions WHERE run_id = %s', (run_id,)
            )
        }
        scaled = connection.execute(
            "SELECT max(desired) FROM scaling_events WHERE service = 'taskiq-worker'"
        ).fetchone()
    assert owners and all(owner.startswith('taskiq-worker-') for owner in owners)
    assert scaled is not None and scaled[0] >= 1

    def logged_in_cloudwatch() -> list[dict[str, Any]]:
        events = [
            json.loads(line) for line in ops(up, 'logs', 'tail', 'taskiq-worker').splitlines()
        ]
        return [e for e in events if run_id in e['message'] and 'step_finished' in e['message']]

    finished = wait_until(logged_in_cloudwatch, what="the run's worker lines in CloudWatch")
    assert {e['stream'] for e in finished} <= owners  # one stream per worker, named after it
    depth = {q['queue']: q for q in json.loads(ops(up, 'queue', 'depth'))}
    assert depth['steps']['visible'] == depth['retries']['visible'] == 0
    assert depth['dead letters']['visible'] == 0
    status = json.loads(ops(up, 'ecs', 'status'))
    assert status['service'] == 'taskiq-worker'
    assert max(d['desired'] for d in status['recent_decisions']) >= 1


def test_a_port_already_served_is_reported_not_used(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run(
            demo_command('up', '--data-dir', str(tmp_path), '--moto-port', str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert refused.returncode == 1
    assert f'port {port} for the AWS emulator (moto) is already in use' in refused.stdout


def test_a_second_up_on_the_same_folder_says_so(up: Up) -> None:
    second = subprocess.run(
        demo_command('up', '--data-dir', str(up.data_dir)),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'DATABASE_URL': up.database_url},
    )
    assert second.returncode != 0
    assert f'a stack is already up from {up.data_dir.resolve()} (pid {up.process.pid})' in (
        second.stdout + second.stderr
    )


def test_a_killed_daemon_is_restarted_and_a_queued_run_still_starts(up: Up) -> None:
    [daemon] = [
        pid
        for pid in children(up.process.pid)
        if b'dagster-daemon' in Path(f'/proc/{pid}/cmdline').read_bytes() and os.getpgid(pid) == pid
    ]
    os.killpg(daemon, signal.SIGKILL)
    wait_until(
        lambda: 'component_restarted' in up.text() and 'dagster-daemon' in up.text(),
        timeout_s=30,
        what='the daemon restarted',
    )
    client = graphql_client(up.web_url)
    run_id = submit(client, 'fast_job', {})
    assert wait_ended(client, [run_id], RUN_TIMEOUT_S) == {run_id: DagsterRunStatus.SUCCESS}


CHROMIUM_FLAGS = [  # the machine's network is closed: no background connections, no sandbox as root
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
]


def test_the_ui_shows_the_finished_run_and_its_steps(up: Up) -> None:
    """Headless chromium opens the stack's UI, finds a finished run in the runs list, opens it
    and sees its steps succeeded; the screenshot is kept in build/test-artifacts/."""
    chromium = shutil.which('chromium')
    if chromium is None:
        pytest.skip(
            'Debian chromium is not installed (.ci/run installs it: apt-get install chromium)'
        )
    from playwright.sync_api import sync_playwright

    client = graphql_client(up.web_url)
    run_id = submit(client, 'fast_job', {})
    assert wait_ended(client, [run_id], RUN_TIMEOUT_S) == {run_id: DagsterRunStatus.SUCCESS}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1600, 'height': 1000})
            page.goto(f'{up.web_url}/runs', timeout=120_000)
            page.locator(f'a[href*="{run_id}"]').first.click(timeout=120_000)
            page.wait_for_url(f'**/runs/{run_id}*', timeout=60_000)
            page.get_by_text('Success', exact=True).first.wait_for(timeout=60_000)
            for step in ('ping', 'add_one', 'add_one_2'):
                page.get_by_text(step, exact=True).first.wait_for(timeout=60_000)
            page.get_by_text('STEP_SUCCESS').first.wait_for(timeout=60_000)
            page.get_by_text('Succeeded (3)').wait_for(timeout=60_000)  # the steps panel
            skip = page.get_by_role('button', name='Skip')  # Dagster's newsletter dialog
            if skip.count():
                skip.click()
            page.screenshot(path=str(ARTIFACTS / 'ui-run.png'), full_page=True)
        finally:
            browser.close()


def test_sigterm_stops_everything_and_frees_the_ports(up: Up) -> None:
    assert len(children(up.process.pid)) >= 6  # moto, webserver, daemon, scaler, agent, workers
    assert_stops_cleanly(up)


def test_up_on_localstack_runs_sqs_and_logs_there(tmp_path: Path) -> None:
    """`--emulator localstack`: SQS and CloudWatch Logs on LocalStack (host mode), ECS on moto;
    a job runs, its worker's lines reach CloudWatch, and the stack stops cleanly."""
    made = subprocess.run(
        ['make', '-s', 'localstack'], cwd=REPOSITORY, capture_output=True, text=True, timeout=600
    )
    if made.returncode != 0:
        pytest.skip(f'LocalStack cannot be installed here (make localstack): {made.stderr[-500:]}')
    localstack_port = free_port()
    with running_up(
        tmp_path,
        *('--emulator', 'localstack', '--localstack-port', str(localstack_port)),
        *('--localstack-python', str(REPOSITORY / '.localstack' / 'bin' / 'python')),
    ) as up:
        described = json.loads((up.data_dir / 'stack.json').read_text())
        assert described['aws_endpoint_url'] == f'http://127.0.0.1:{localstack_port}'
        client = graphql_client(up.web_url)
        run_id = submit(client, 'fast_job', {})
        assert wait_ended(client, [run_id], RUN_TIMEOUT_S) == {run_id: DagsterRunStatus.SUCCESS}
        assert {q['queue'] for q in json.loads(ops(up, 'queue', 'depth'))} == {
            'steps',
            'retries',
            'dead letters',
        }
        wait_until(
            lambda: run_id in ops(up, 'logs', 'tail', 'taskiq-worker'),
            what="the run's worker lines in LocalStack's CloudWatch Logs",
        )
        up.ports = (*up.ports, localstack_port)
        assert_stops_cleanly(up)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A data folder the `postgres` user can reach (pytest's own tmp folders are private)."""
    with tempfile.TemporaryDirectory(prefix='stack-') as name:
        Path(name).chmod(0o755)
        yield Path(name)


def private_postgres(folder: Path, bin_dir: Path) -> LocalStack:
    stack = LocalStack(StackOptions(data_dir=folder, database_url=None), threading.Event())
    stack.start_private_postgres(bin_dir)
    return stack


@pytest.fixture(params=['system', 'pgserver'])
def bin_dir(request: pytest.FixtureRequest) -> Path:
    """The system's PostgreSQL, and the pgserver package's (what a machine without one uses)."""
    if request.param == 'pgserver':
        return pgserver_bin_dir()
    found = postgres_bin_dir()
    if found == pgserver_bin_dir():
        pytest.skip('no PostgreSQL server installed on this machine (initdb)')
    return found


def test_a_private_postgres_keeps_its_data_between_starts_and_stops_with_the_stack(
    folder: Path, bin_dir: Path
) -> None:
    stack = private_postgres(folder, bin_dir)
    server_url = stack.database_url.rsplit('/', 1)[0] + '/postgres'
    try:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute('CREATE TABLE kept (value int)')
            connection.execute('INSERT INTO kept VALUES (42)')
    finally:
        stack.stop()
    [server] = stack.components
    assert server.pid is not None and not group_alive(server.pid)
    again = private_postgres(folder, bin_dir)
    try:
        assert again.database_url == stack.database_url  # same port: same URL
        with psycopg.connect(server_url) as connection:
            assert connection.execute('SELECT value FROM kept').fetchall() == [(42,)]
    finally:
        again.stop()


def test_ctrl_c_during_the_demo_is_one_clean_stop_on_a_private_postgres(folder: Path) -> None:
    """`demo --private-postgres`: the whole stack on PostgreSQL of its own (as on a machine with
    none). Once a run has succeeded and others are still going, one Ctrl-C (SIGINT to the
    foreground process group, as a terminal sends it) terminates the runs still going, stops
    everything and exits 130: no traceback, no process left, every port free."""
    moto_port, web_port = free_port(), free_port()
    output = folder / 'demo.out'
    with output.open('wb') as out:
        process = subprocess.Popen(
            demo_command(
                'demo',
                *('--data-dir', str(folder / 'data'), '--env', 'e2e', '--max-workers', '2'),
                *('--moto-port', str(moto_port), '--webserver-port', str(web_port)),
                '--private-postgres',
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k != 'DATABASE_URL'}, 'COLUMNS': '200'},
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
    try:

        def database_url() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f'demo exited with {process.returncode}:\n{text()}')
            found = re.search(r'Database (postgresql://\S+);', text())
            return found[1] if found else None

        def text() -> str:
            return output.read_text(errors='replace')

        url = wait_until(database_url, timeout_s=UP_TIMEOUT_S, what='the stack up')
        assert 'PostgreSQL of its own' in text() and ':5432/' not in url

        def one_succeeded_others_going() -> bool:
            with psycopg.connect(url) as connection:
                counts = dict(connection.execute('SELECT status, count(*) FROM runs GROUP BY 1'))
            ended = sum(counts.get(s, 0) for s in ('SUCCESS', 'FAILURE', 'CANCELED'))
            return counts.get('SUCCESS', 0) >= 1 and ended < 7

        wait_until(one_succeeded_others_going, timeout_s=RUN_TIMEOUT_S, what='a run succeeded')
        started = children(process.pid)
        postgres_port = int(url.rsplit(':', 1)[1].split('/')[0])
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 130, text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT_S)
    assert 'interrupted: terminating the runs still going' in text()
    assert 'CANCELED' in text()  # the runs still going, in the table printed before stopping
    assert 'Traceback' not in text()
    assert [pid for pid in started if alive(pid)] == []
    assert not any(port_in_use(port) for port in (moto_port, web_port, postgres_port))
