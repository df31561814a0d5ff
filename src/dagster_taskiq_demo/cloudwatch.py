"""CloudWatch Logs for the local stack: its components' output shipped as ECS's awslogs driver
ships a container's, and read back for `dagster-taskiq-demo logs tail`.

Components log to files (JSON lines from ours, Dagster's own lines from the webserver and daemon);
`LogShipper` sends each new complete line to the service's log group `/aws/ecs/{service}-{env}`,
one stream per process, in batches, from a thread: a failed PutLogEvents keeps its lines for the
next round (with backoff), so nothing waits on CloudWatch and nothing is dropped while it is away.
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.logs import get_logger

log = get_logger(__name__)

MAX_BATCH_EVENTS = 1000  # CloudWatch takes up to 10,000 events or 1 MiB per PutLogEvents
MAX_BATCH_BYTES = 900_000
MAX_EVENT_BYTES = 250_000  # CloudWatch's limit is 256 KiB per event, 26 bytes of overhead
SHIP_INTERVAL_S = 1.0
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class LogSource:
    path: Path
    group: str
    stream: str


def log_group(service: str, env_name: str) -> str:
    return f'/aws/ecs/{service}-{env_name}'


def batches(lines: list[str], at_ms: int) -> Iterator[list[dict[str, Any]]]:
    """PutLogEvents batches of `lines` (each cut to CloudWatch's size limit), in order."""
    batch: list[dict[str, Any]] = []
    size = 0
    for line in lines:
        message = line.encode()[:MAX_EVENT_BYTES].decode(errors='ignore') or ' '
        event_size = len(message.encode()) + 26
        if batch and (len(batch) >= MAX_BATCH_EVENTS or size + event_size > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append({'timestamp': at_ms, 'message': message})
        size += event_size
    if batch:
        yield batch


class LogShipper:
    """Ships new lines of each source's file to its log group and stream, every second."""

    def __init__(self, logs: Any, sources: Callable[[], list[LogSource]]) -> None:
        self.logs = logs
        self.sources = sources
        self.offsets: dict[Path, int] = {}
        self.streams: set[tuple[str, str]] = set()
        self.shipped = 0
        self.failures = 0

    def ship_once(self) -> None:
        for source in self.sources():
            self._ship(source)

    def _ship(self, source: LogSource) -> None:
        offset = self.offsets.get(source.path, 0)
        try:
            with source.path.open('rb') as log_file:
                log_file.seek(offset)
                data = log_file.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b'\n') + 1]  # a line still being written waits
        if not complete:
            return
        if (source.group, source.stream) not in self.streams:
            with contextlib.suppress(self.logs.exceptions.ResourceAlreadyExistsException):
                self.logs.create_log_stream(logGroupName=source.group, logStreamName=source.stream)
            self.streams.add((source.group, source.stream))
        lines = complete.decode(errors='replace').splitlines()
        for batch in batches(lines, int(time.time() * 1000)):
            self.logs.put_log_events(
                logGroupName=source.group, logStreamName=source.stream, logEvents=batch
            )
        self.offsets[source.path] = offset + len(complete)
        self.shipped += len(lines)

    def run(self, stop: threading.Event) -> None:
        """Ship until `stop` is set, then once more; a failed round is retried with backoff."""
        while True:
            stopping = stop.is_set()
            try:
                self.ship_once()
                self.failures = 0
            except (BotoCoreError, ClientError) as error:
                self.failures += 1
                if self.failures == 1:
                    log.warning('log_shipping_failed', error=str(error))
            if stopping:
                return
            backoff_s = min(MAX_BACKOFF_S, SHIP_INTERVAL_S * 2**self.failures)
            stop.wait(backoff_s)


def read_events(
    logs: Any, group: str, since_ms: int, after: set[str] | None = None
) -> list[dict[str, Any]]:
    """The group's events from `since_ms` on, oldest first, leaving out the ids in `after`."""
    events: list[dict[str, Any]] = []
    paginator = logs.get_paginator('filter_log_events')
    for page in paginator.paginate(logGroupName=group, startTime=since_ms):
        events.extend(e for e in page['events'] if not after or e['eventId'] not in after)
    return sorted(events, key=lambda e: (e['timestamp'], e.get('ingestionTime', 0)))
