"""Shipping the stack's log files to CloudWatch Logs on a real moto server; reading them back."""

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from dagster_taskiq_demo.cloudwatch import LogShipper, LogSource, batches, read_events
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, MotoServer, free_port
from tests.waiting import wait_until


def logs_client(url: str) -> Any:
    return boto3.client(
        'logs',
        endpoint_url=url,
        region_name='us-east-1',
        aws_access_key_id=EMULATOR_CREDENTIALS['AWS_ACCESS_KEY_ID'],
        aws_secret_access_key=EMULATOR_CREDENTIALS['AWS_SECRET_ACCESS_KEY'],
    )


@pytest.fixture
def group(moto_server: MotoServer) -> str:
    name = f'/aws/ecs/test-{uuid.uuid4().hex[:8]}'
    logs_client(moto_server.url).create_log_group(logGroupName=name)
    return name


def messages(logs: Any, group: str) -> list[str]:
    return [e['message'] for e in read_events(logs, group, 0)]


def test_complete_lines_are_shipped_once_and_a_partial_line_waits(
    moto_server: MotoServer, group: str, tmp_path: Path
) -> None:
    logs = logs_client(moto_server.url)
    path = tmp_path / 'worker-1.log'
    path.write_text('{"event": "worker_started"}\n{"event": "step_sta')
    shipper = LogShipper(logs, lambda: [LogSource(path, group, 'worker-1')])
    shipper.ship_once()
    shipper.ship_once()  # nothing new: nothing sent twice
    assert messages(logs, group) == ['{"event": "worker_started"}']
    with path.open('a') as log_file:
        log_file.write('rted"}\n')
    shipper.ship_once()
    assert messages(logs, group) == ['{"event": "worker_started"}', '{"event": "step_started"}']
    [stream] = logs.describe_log_streams(logGroupName=group)['logStreams']
    assert stream['logStreamName'] == 'worker-1'


def test_lines_written_while_cloudwatch_is_away_are_shipped_when_it_returns(
    moto_server: MotoServer, group: str, tmp_path: Path
) -> None:
    """PutLogEvents failing (nothing listens) keeps the lines; the next round sends them."""
    path = tmp_path / 'daemon.log'
    path.write_text('line 1\nline 2\n')
    away = logs_client(f'http://127.0.0.1:{free_port()}')
    shipper = LogShipper(away, lambda: [LogSource(path, group, 'daemon')])
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: shipper.failures >= 1, what='a failed round')
        shipper.logs = logs_client(moto_server.url)  # CloudWatch answers again
        logs = shipper.logs
        wait_until(lambda: messages(logs, group) == ['line 1', 'line 2'], what='the lines')
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_batches_respect_cloudwatchs_limits() -> None:
    lines = ['x' * 300_000, *[f'line {n}' for n in range(2500)]]
    sent = list(batches(lines, int(time.time() * 1000)))
    assert [len(b) for b in sent] == [1000, 1000, 501]
    assert len(sent[0][0]['message'].encode()) <= 256 * 1024 - 26
    assert [e['message'] for b in sent for e in b][1:] == lines[1:]
