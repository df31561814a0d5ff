"""The load simulator as the README runs it, against a whole local stack, with real faults."""

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.up import Up, running_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# A short lease, so that a killed or frozen worker's step fails over within seconds (the stack's
# workers and run workers, and the simulator's freeze, all read these).
SHORT_LEASE = {
    'DAGSTER_TASKIQ_LEASE_S': '6',
    'DAGSTER_TASKIQ_ABANDON_GRACE_S': '1',
    'DAGSTER_TASKIQ_VISIBILITY_TIMEOUT_S': '12',
    'DAGSTER_TASKIQ_STORE_CALL_TIMEOUT_S': '2',
}
ENDED = {'SUCCESS', 'FAILURE', 'CANCELED'}


@pytest.fixture(scope='module')
def up() -> Iterator[Up]:
    """A stack on a PostgreSQL of its own (worker-failure restarts it) whose workers reach SQS
    and their store through fault proxies (network-partition cuts them)."""
    with tempfile.TemporaryDirectory(prefix='load-') as name:
        Path(name).chmod(0o755)  # its postgres user reaches the data folder
        with running_up(
            Path(name), '--fault-proxies', env=SHORT_LEASE, private_postgres=True
        ) as started:
            yield started


def simulate(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            *('-m', 'dagster_taskiq_demo.load_simulator.cli', *args),
            *('--data-dir', str(up.data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, **SHORT_LEASE, 'COLUMNS': '200'},
    )


def scenario_report(up: Up, output: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    found = re.search(r'scenario (\S+) \(seed', output)
    assert found, output
    report = tmp_path / 'report.json'
    verified = simulate(up, 'verify', '--scenario', found[1], '--output', str(report))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return found[1], json.loads(report.read_text())


def test_worker_failure_kills_and_freezes_workers_and_verify_finds_nothing_broken(
    up: Up, tmp_path: Path
) -> None:
    done = simulate(
        up,
        'worker-failure',
        *('--failure-burst-size', '4', '--recovery-interval', '0.5', '--duration', '40'),
        *('--seed', '7', '--wait-timeout', '180'),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scenario_id, report = scenario_report(up, done.stdout, tmp_path)
    assert set(report['runs_by_status']) <= ENDED
    assert sum(report['runs_by_status'].values()) == 8  # two bursts of four
    assert {fault['kind'] for fault in report['faults']} == {'kill', 'freeze', 'db-restart'}
    assert set(report['failures'].values()) == {0}, report['findings']
    assert report['counts']['attempts_abandoned'] >= 1
    assert report['percentiles_s']['failover']['count'] >= 1
    with psycopg.connect(up.database_url) as connection:
        abandoned = connection.execute(  # and retried (unless a third fault spent the retries)
            'SELECT run_id, e.step_key FROM step_executions e JOIN load_submissions USING (run_id)'
            " WHERE scenario_id = %s AND e.state = 'ABANDONED' AND EXISTS (SELECT 1 FROM"
            ' step_executions n WHERE n.run_id = e.run_id AND n.step_key = e.step_key'
            ' AND n.attempt = e.attempt + 1)',
            (scenario_id,),
        ).fetchall()
        assert abandoned
        for run_id, step_key in abandoned:  # Dagster's own log shows the step's retry
            restarted = connection.execute(
                'SELECT count(*) FROM event_logs WHERE run_id = %s AND step_key = %s'
                " AND dagster_event_type = 'STEP_RESTARTED'",
                (run_id, step_key),
            ).fetchone()
            assert restarted is not None and restarted[0] >= 1, (run_id, step_key)


def test_network_partitions_cut_workers_off_and_verify_finds_nothing_broken(
    up: Up, tmp_path: Path
) -> None:
    done = simulate(
        up,
        'network-partition',
        *('--max-burst-size', '4', '--duration', '45', '--seed', '3', '--wait-timeout', '180'),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _, report = scenario_report(up, done.stdout, tmp_path)
    assert set(report['runs_by_status']) <= ENDED
    partitions = [fault for fault in report['faults'] if fault['kind'] == 'partition']
    assert len(partitions) >= 2 and all(fault['ended_at'] for fault in partitions)
    assert set(report['failures'].values()) == {0}, report['findings']
    links = (up.data_dir / 'logs' / 'ecs-agent.log').read_text()
    assert '"link_set"' in links and '"mode": "pass"' in links  # cut, then healed


def test_bursts_run_and_verify(up: Up, tmp_path: Path) -> None:
    done = simulate(
        up, 'burst-load', *('--burst-size', '3', '--burst-interval', '0.2', '--duration', '15')
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _, report = scenario_report(up, done.stdout, tmp_path)
    assert report['runs_by_status'] == {'SUCCESS': 6}  # bursts of three at 0 s and 12 s


def test_a_mixed_workload_ends_each_kind_of_run_as_meant_and_verifies(
    up: Up, tmp_path: Path
) -> None:
    done = simulate(up, 'mixed-workload', '--jobs-per-minute', '30', '--duration', '10')
    assert done.returncode == 0, done.stdout + done.stderr
    scenario_id, report = scenario_report(up, done.stdout, tmp_path)
    with psycopg.connect(up.database_url) as connection:
        statuses = dict(
            connection.execute(
                'SELECT job_name, status FROM load_submissions JOIN runs USING (run_id)'
                ' WHERE scenario_id = %s',
                (scenario_id,),
            ).fetchall()
        )
    assert len(statuses) == 8  # each kind of job once
    assert statuses.pop('failing_job') == 'FAILURE'  # meant to fail: no retry policy
    assert set(statuses.values()) == {'SUCCESS'}  # flaky and crashing ones pass on retry
    assert report['counts']['attempts_retried'] >= 2
