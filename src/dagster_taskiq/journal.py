"""The local journal: step outcomes that could not be written because the database was unreachable.

A worker appends one JSON line per outcome to `<dir>/journal-<worker_id>.jsonl` (flushed and
fsynced before the message is deleted) and holds an exclusive lock on `journal-<worker_id>.lock`
while it lives. Reconciling writes each outcome with the same fenced `finish` (a stale one changes
nothing) for the worker's own journal and for every journal whose lock is free: its worker is
gone, so any worker sharing the folder takes it over, and the lock keeps a second one out. An
entry is either written (or refused as stale), kept for the next pass while the database is
unreachable, or, when it can never be written (a torn line, a value the database rejects), set
aside in `journal-<worker_id>.rejected.jsonl` with its reason; it never blocks the others.
"""

import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagster_taskiq.errors import ConfigError, StoreUnavailable
from dagster_taskiq.logs import FilteringBoundLogger
from dagster_taskiq.store import DagsterEventRow, StepState, Store


@dataclass(frozen=True)
class Entry:
    key: str
    token: int
    outcome: StepState
    error: str | None = None
    effects: Sequence[dict[str, Any]] = field(default_factory=list)
    dagster_event: DagsterEventRow | None = None


@dataclass
class Reconciled:
    written: int = 0  # finished, or refused as stale
    set_aside: int = 0


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


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    with path.open('a') as file:
        file.writelines(line + '\n' for line in lines)
        file.flush()
        os.fsync(file.fileno())


def _replace(path: Path, lines: Sequence[str]) -> None:
    """Make `lines` the content of `path` atomically (durably), or remove it when empty."""
    if not lines:
        path.unlink(missing_ok=True)
    else:
        partial = path.with_name(path.name + '.partial')
        partial.write_text('')
        _append_lines(partial, lines)
        partial.replace(path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _parse(line: str) -> Entry:
    fields = json.loads(line)
    return Entry(**{**fields, 'outcome': StepState(fields['outcome'])})


def _try_lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock, or None when another holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


class Journal:
    """One worker's journal in `directory` (open it before use: it takes the worker's lock)."""

    def __init__(self, directory: Path, worker_id: str, logger: FilteringBoundLogger) -> None:
        self.directory = directory
        self.worker_id = worker_id
        self.log = logger
        self._lock: int | None = None

    def _path(self, worker_id: str, suffix: str = '.jsonl') -> Path:
        return self.directory / f'journal-{worker_id}{suffix}'

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _try_lock(self._path(self.worker_id, '.lock'))
        if self._lock is None:
            raise ConfigError(
                f'the journal of worker {self.worker_id} in {self.directory} is held by another '
                'live worker: give each worker its own --worker-id'
            )

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def append(self, entry: Entry) -> None:
        """Add `entry`, durably (flushed and fsynced) before this returns."""
        _append_lines(self._path(self.worker_id), [json.dumps(asdict(entry))])

    async def reconcile(self, store: Store) -> Reconciled:
        """Write the outcomes of this worker's journal and of every journal nobody holds.

        StoreUnavailable (after keeping what was not written) when the database is unreachable.
        """
        reconciled = Reconciled()
        await self._reconcile_one(self.worker_id, store, reconciled)
        for worker_id in self._orphans():
            lock = _try_lock(self._path(worker_id, '.lock'))
            if lock is None:
                continue  # its worker lives, or another worker is taking it over
            try:
                await self._reconcile_one(worker_id, store, reconciled)
                if not self._path(worker_id).exists():
                    self._path(worker_id, '.lock').unlink(missing_ok=True)
            finally:
                os.close(lock)
        return reconciled

    def _orphans(self) -> list[str]:
        names = {path.name for path in self.directory.glob('journal-*.jsonl')} | {
            path.name for path in self.directory.glob('journal-*.lock')
        }
        ids = {name.removeprefix('journal-').rsplit('.', 1)[0] for name in names}
        return sorted(ids - {self.worker_id} - {i for i in ids if i.endswith('.rejected')})

    async def _reconcile_one(self, worker_id: str, store: Store, reconciled: Reconciled) -> None:
        """Write the entries of `worker_id`'s journal, whose lock this process holds.

        The entries read are written one by one; the file is then replaced, in one step with no
        await, by what was kept plus what was appended meanwhile (by this process only).
        """
        path = self._path(worker_id)
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return
        kept: list[str] = []
        lines = content.decode(errors='replace').splitlines()
        try:
            for index, line in enumerate(lines):
                try:
                    await write(store, _parse(line))
                except StoreUnavailable:
                    kept = lines[index:]
                    raise
                except Exception as error:  # noqa: BLE001 - set aside, never blocking the rest
                    self._set_aside(line, error)
                    reconciled.set_aside += 1
                else:
                    reconciled.written += 1
        finally:
            with path.open('rb') as file:
                file.seek(len(content))
                appended = file.read().decode(errors='replace').splitlines()
            _replace(path, [*kept, *appended])

    def _set_aside(self, line: str, error: Exception) -> None:
        reason = f'{type(error).__name__}: {error}'
        _append_lines(
            self._path(self.worker_id, '.rejected.jsonl'),
            [json.dumps({'entry': line, 'reason': reason})],
        )
        self.log.error('journal_entry_set_aside', entry=line[:1000], reason=reason)
