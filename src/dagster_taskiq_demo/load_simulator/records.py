"""The simulator's record of what it did: each run it submitted and each fault it injected
(tables of the demo, created on first use; SQL in records.sql)."""

from pathlib import Path

from sqlalchemy import Engine, text

from dagster_taskiq.sql import load_queries
from dagster_taskiq_demo.definitions import OP_RUNS_TABLE

QUERIES = load_queries(Path(__file__).with_suffix('.sql'))


def ensure_tables(engine: Engine) -> None:
    """Create the simulator's and the demo ops' tables where missing (one session at a time)."""
    statements = [*QUERIES['create_tables'].split(';\n'), *OP_RUNS_TABLE.split(';\n')]
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('demo_op_runs'))"))
        for statement in statements:
            connection.execute(text(statement))


def record_submission(
    engine: Engine, scenario_id: str, run_id: str, job_name: str, seed: int
) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(QUERIES['record_submission']),
            {'scenario_id': scenario_id, 'run_id': run_id, 'job_name': job_name, 'seed': seed},
        )


def record_fault(engine: Engine, scenario_id: str, kind: str, target: str, detail: str = '') -> int:
    """A fault injected now; its id, for `fault_ended` when it is lifted."""
    with engine.begin() as connection:
        fault_id: int = connection.execute(
            text(QUERIES['record_fault']),
            {'scenario_id': scenario_id, 'kind': kind, 'target': target, 'detail': detail},
        ).scalar_one()
    return fault_id


def fault_ended(engine: Engine, fault_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(text(QUERIES['fault_ended']), {'id': fault_id})
