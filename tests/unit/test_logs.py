"""One format for every logger of a service (run in a subprocess: logging is process-wide)."""

import json
import subprocess
import sys

SCRIPT = """
import logging
from dagster_taskiq.logs import configure_logging, get_logger
configure_logging({log_format!r}, {level!r})
get_logger('dagster_taskiq.worker').info('step_finished', duration_s=1.23456, attempt=0)
logging.getLogger('alembic.runtime.migration').info('Running upgrade 0001 -> 0002')
logging.getLogger('botocore.credentials').info('Found credentials')  # chatty: only warnings
get_logger('dagster_taskiq.worker').debug('receive_started')
try:
    raise ValueError('boom')
except ValueError as error:
    get_logger('dagster_taskiq.worker').error('message_task_crashed', exc_info=error)
"""


def logged(log_format: str, level: str = 'info') -> str:
    script = SCRIPT.format(log_format=log_format, level=level)
    result = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, check=True
    )
    return result.stderr


def test_json_lines_from_structlog_and_the_stdlib_alike() -> None:
    lines = [json.loads(line) for line in logged('json').splitlines()]
    assert [(line['logger'], line['event']) for line in lines] == [
        ('dagster_taskiq.worker', 'step_finished'),
        ('alembic.runtime.migration', 'Running upgrade 0001 -> 0002'),
        ('dagster_taskiq.worker', 'message_task_crashed'),
    ]
    assert lines[0]['duration_s'] == 1.235  # durations rounded to the millisecond
    assert lines[2]['level'] == 'error'
    assert 'ValueError: boom' in lines[2]['exception']  # with its traceback


def test_debug_shows_debug_lines_and_console_is_readable() -> None:
    assert '"event": "receive_started"' in logged('json', 'debug')
    console = logged('console')
    assert 'step_finished' in console and 'duration_s=1.235' in console
    assert not console.lstrip().startswith('{')
