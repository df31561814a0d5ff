"""`verify`: read what the runs left behind and find every way exactly-once could have broken.

It reads Dagster's run storage and event log, the store (`step_executions`, `execution_log`,
`step_effects`, `scaling_events`), the simulator's submissions and fault log, and the demo ops' own
begin/end rows (`demo_op_runs`), all in the stack's one database (SQL in verify.sql). A report
with any finding in `FAILURE_CLASSES` is a failed verification.
"""

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text

from dagster_taskiq.sql import load_queries
from dagster_taskiq.store import sync_engine
from dagster_taskiq_demo.definitions import ALIVE_INTERVAL_S
from dagster_taskiq_demo.load_simulator.records import ensure_tables

QUERIES = {
    name: text(sql) for name, sql in load_queries(Path(__file__).with_suffix('.sql')).items()
}
# Each of these found even once fails the verification (exit status 1).
FAILURE_CLASSES = (
    'duplicate_executions',
    'overlapping_attempts',
    'disagreements',
    'effect_problems',
    'lost_steps',
    'stranded',
)
# The demo ops that write an outbox effect when they complete, as 'job/step'.
EFFECT_STEPS = [
    'side_effect_job/effect_a',
    'side_effect_job/effect_b',
    'side_effect_job/effect_c',
    'recorded_job/recorded_sleep',
]
SETTLE_S = 60.0  # how long a run may show no progress, or a lease stay expired, before it counts
PERCENTILES = (50, 95, 99)


@dataclass
class Report:
    scope: str  # 'all runs' or 'scenario <id>'
    runs_by_status: dict[str, int]
    counts: dict[str, int]
    findings: dict[str, list[dict[str, str]]]  # FAILURE_CLASSES -> (run_id, step_key, what)
    percentiles_s: dict[str, dict[str, float | None]]  # queue_wait, execution, failover
    failovers: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    failure_times: list[datetime] = field(default_factory=list)  # abandoned attempts, failed runs

    @property
    def failures(self) -> dict[str, int]:
        return {name: len(self.findings[name]) for name in FAILURE_CLASSES}

    @property
    def failed(self) -> bool:
        return any(self.failures.values())


def percentiles(values: Sequence[Any]) -> dict[str, float | None]:
    """p50/p95/p99 (nearest rank) and max of `values`, None where there are none."""
    ordered = sorted(float(value) for value in values)  # numeric from PostgreSQL: Decimal
    found: dict[str, float | None] = {'count': float(len(ordered))}
    for p in PERCENTILES:
        rank = math.ceil(p / 100 * len(ordered)) - 1
        found[f'p{p}'] = round(ordered[max(rank, 0)], 3) if ordered else None
    found['max'] = round(ordered[-1], 3) if ordered else None
    return found


def _rows(connection: Connection, name: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in connection.execute(QUERIES[name], params).mappings()]


def verify(database_url: str, scenario_id: str | None = None, settle_s: float = SETTLE_S) -> Report:
    """The report of the runs of `scenario_id` (every run in Dagster's storage when None)."""
    engine = sync_engine(database_url)
    try:
        ensure_tables(engine)
        with engine.begin() as connection:
            if scenario_id is None:
                connection.execute(QUERIES['scope_all'])
            else:
                connection.execute(QUERIES['scope_scenario'], {'scenario_id': scenario_id})
            return _report(connection, scenario_id, settle_s)
    finally:
        engine.dispose()


def _report(connection: Connection, scenario_id: str | None, settle_s: float) -> Report:
    findings = {
        'duplicate_executions': _rows(connection, 'duplicate_executions'),
        'overlapping_attempts': _rows(
            connection, 'overlapping_attempts', alive_interval_s=ALIVE_INTERVAL_S
        ),
        'disagreements': _rows(connection, 'disagreements'),
        'effect_problems': _rows(connection, 'effect_problems', effect_steps=EFFECT_STEPS),
        'lost_steps': _rows(connection, 'lost_steps'),
        'stranded': _rows(connection, 'stranded', settle_s=settle_s),
    }
    latencies = _rows(connection, 'latencies')
    failovers = _rows(connection, 'failovers')
    window = _rows(connection, 'window')[0]
    return Report(
        scope='all runs' if scenario_id is None else f'scenario {scenario_id}',
        runs_by_status={r['status']: r['runs'] for r in _rows(connection, 'runs_by_status')},
        counts=_rows(connection, 'counts')[0],
        findings=findings,
        percentiles_s={
            'queue_wait': percentiles([r['queue_wait_s'] for r in latencies]),
            'execution': percentiles(
                [r['execution_s'] for r in latencies if r['execution_s'] is not None]
            ),
            'failover': percentiles([r['failover_s'] for r in failovers]),
        },
        failovers=failovers,
        faults=_rows(connection, 'faults'),
        scaling=_rows(connection, 'scaling_timeline', **window) if window['since'] else [],
        failure_times=[row['at'] for row in _rows(connection, 'failure_times')],
    )


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):  # extract(epoch ...) is numeric
        return float(value)
    return str(value)


def as_dict(report: Report) -> dict[str, Any]:
    document = asdict(report)
    document['failures'] = report.failures
    document['verified'] = not report.failed
    plain: dict[str, Any] = json.loads(json.dumps(document, default=_plain))
    return plain


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(as_dict(report), indent=2) + '\n')


def write_csv(report: Report, path: Path) -> None:
    """One row per figure or finding: section, name, value (findings: run_id/step_key, what)."""
    document = as_dict(report)
    with path.open('w', newline='') as out:
        writer = csv.writer(out)
        writer.writerow(['section', 'name', 'value'])
        writer.writerow(['summary', 'verified', document['verified']])
        for section in ('runs_by_status', 'counts', 'failures'):
            for name, value in document[section].items():
                writer.writerow([section, name, value])
        for kind, figures in document['percentiles_s'].items():
            for name, value in figures.items():
                writer.writerow(['percentiles_s', f'{kind}.{name}', value])
        for kind, found in document['findings'].items():
            for finding in found:
                writer.writerow(
                    [kind, f'{finding["run_id"]}/{finding["step_key"]}', finding['what']]
                )
        for fault in document['faults']:
            writer.writerow(['faults', f'{fault["kind"]} {fault["target"]}', fault['at']])
