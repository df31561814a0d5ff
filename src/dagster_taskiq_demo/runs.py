"""Runs of the demo jobs through Dagster's GraphQL API (as a user's UI click or script submits
them), and what the store saw of them."""

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from dagster_taskiq_demo.stack import wait_for

LOCATION_NAME = 'dagster_taskiq_demo'  # templates/workspace.yaml
REPOSITORY_NAME = '__repository__'  # what Dagster names the repository of a `Definitions`
ENDED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def graphql_client(web_url: str) -> DagsterGraphQLClient:
    host, port = web_url.removeprefix('http://').rsplit(':', 1)
    return DagsterGraphQLClient(host, port_number=int(port))


def submit(
    client: DagsterGraphQLClient,
    job_name: str,
    run_config: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """Submit a run of a demo job (queued by the daemon's run coordinator); its run id."""
    run_id: str = client.submit_job_execution(
        job_name,
        repository_location_name=LOCATION_NAME,
        repository_name=REPOSITORY_NAME,
        run_config=run_config,
        tags=tags,
    )
    return run_id


class Interrupted(RuntimeError):
    """A stop was asked while waiting."""


def wait_ended(
    client: DagsterGraphQLClient,
    run_ids: list[str],
    timeout_s: float,
    stop: threading.Event | None = None,
) -> dict[str, DagsterRunStatus]:
    """Each run's status once every one has ended; TimeoutError naming those that have not,
    Interrupted as soon as `stop` is set."""
    statuses: dict[str, DagsterRunStatus] = {}

    def all_ended() -> bool:
        if stop is not None and stop.is_set():
            raise Interrupted('stopped while waiting for the runs')
        for run_id in run_ids:
            if statuses.get(run_id) not in ENDED:
                statuses[run_id] = client.get_run_status(run_id)
        return all(status in ENDED for status in statuses.values())

    try:
        wait_for(all_ended, timeout_s, 'every run ended')
    except TimeoutError as error:
        waiting = {run_id: str(statuses.get(run_id)) for run_id in run_ids}
        raise TimeoutError(f'{error}: {waiting}') from error
    return statuses


def terminate(
    client: DagsterGraphQLClient, run_ids: list[str], timeout_s: float
) -> dict[str, DagsterRunStatus]:
    """Terminate those of `run_ids` that have not ended, as the UI's Terminate does, and wait
    (bounded) for them to end: each run's status then."""
    going = [run_id for run_id in run_ids if client.get_run_status(run_id) not in ENDED]
    if going:
        with contextlib.suppress(DagsterGraphQLClientError):  # one ended meanwhile
            client.terminate_runs(going)
    with contextlib.suppress(TimeoutError):
        return wait_ended(client, run_ids, timeout_s)
    return {run_id: client.get_run_status(run_id) for run_id in run_ids}


@dataclass(frozen=True)
class RunSteps:
    steps: int
    attempts: int
    retries: int
    workers: list[str]


def run_steps(database_url: str, run_id: str) -> RunSteps:
    """What the idempotency store saw of a run: its steps, attempts, retries and workers."""
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            'SELECT count(DISTINCT step_key), count(*), count(*) FILTER (WHERE attempt > 0),'
            ' array_remove(array_agg(DISTINCT owner), NULL)'
            ' FROM step_executions WHERE run_id = %s',
            (run_id,),
        ).fetchone()
    assert row is not None  # an aggregate returns one row
    return RunSteps(
        steps=row[0], attempts=row[1], retries=row[2], workers=sorted(row[3] or [])
    )  # NULL: no attempt yet
