"""The local journal: step outcomes that could not be written because the database was unreachable.

One JSON line per outcome in `<dir>/journal-<worker_id>.jsonl`. Reconciling claims a file by
renaming it, writes each outcome with the same fenced `finish` (so a stale one changes nothing),
and journals again what still cannot be written. Any worker on the host reconciles any file, so an
outcome survives the worker that journaled it.
"""

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagster_taskiq.errors import StoreUnavailable
from dagster_taskiq.store import DagsterEventRow, StepState, Store


@dataclass(frozen=True)
class Entry:
    key: str
    token: int
    outcome: StepState
    error: str | None = None
    effects: Sequence[dict[str, Any]] = field(default_factory=list)
    dagster_event: DagsterEventRow | None = None


async def write(store: Store, entry: Entry) -> bool:
    """Record the outcome (fenced); False when the token was stale."""
    return await store.finish(
        entry.key,
        token=entry.token,
        outcome=entry.outcome,
        error=entry.error,
        effects=entry.effects,
        dagster_event=entry.dagster_event,
    )


def append(directory: Path, worker_id: str, entry: Entry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f'journal-{worker_id}.jsonl').open('a') as file:
        file.write(json.dumps(asdict(entry)) + '\n')


def _entries(path: Path) -> list[Entry]:
    entries = []
    for line in path.read_text().splitlines():
        fields = json.loads(line)
        entries.append(Entry(**{**fields, 'outcome': StepState(fields['outcome'])}))
    return entries


def _claim(directory: Path, worker_id: str) -> list[tuple[Path, list[Entry]]]:
    """Take every journal file in `directory` (renamed, so no other worker takes it too)."""
    claimed = []
    for path in sorted(directory.glob('journal-*.jsonl')):
        taken = path.with_name(f'{path.name}.{worker_id}.reconciling')
        try:
            path.rename(taken)
        except FileNotFoundError:
            continue  # another worker took it first
        claimed.append((taken, _entries(taken)))
    return claimed


async def reconcile(directory: Path, worker_id: str, store: Store) -> int:
    """Write every journaled outcome in `directory`; returns how many were written (or refused).

    What cannot be written yet goes back into this worker's journal, and StoreUnavailable is raised.
    A taken file is removed only once its outcomes are written or journaled again.
    """
    written = 0
    for path, entries in await asyncio.to_thread(_claim, directory, worker_id):
        for index, entry in enumerate(entries):
            try:
                await write(store, entry)
            except StoreUnavailable:
                for rest in entries[index:]:
                    append(directory, worker_id, rest)
                path.unlink()
                raise
            written += 1
        path.unlink()
    return written
