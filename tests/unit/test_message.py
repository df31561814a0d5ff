"""The step message: build, sign, parse, verify; the parser raises nothing but InvalidMessage."""

import contextlib
import json
from dataclasses import asdict, replace
from typing import Any

import pytest
from dagster._grpc.types import ExecuteStepArgs
from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.errors import InvalidMessage
from dagster_taskiq.message import (
    MAX_MESSAGE_BYTES,
    OpExecutionTask,
    build_task,
    encode,
    parse,
    step_args,
)
from tests.one_op import step_args as one_op_step_args

KEY = b'shared-secret'


def make_args(attempt: int = 0, step_key: str = 'noop') -> ExecuteStepArgs:
    return one_op_step_args('run-1', attempt, step_key)


def make_task(attempt: int = 0) -> OpExecutionTask:
    return build_task(make_args(attempt), job_name='one_op_job', enqueued_at=1_700_000_000.5)


def fields_of(task: OpExecutionTask) -> dict[str, Any]:
    return asdict(task)


def test_build_derives_the_key_from_run_step_and_attempt() -> None:
    task = make_task(attempt=2)
    assert (task.v, task.run_id, task.step_key, task.attempt) == (1, 'run-1', 'noop', 2)
    assert task.idempotency_key == 'run-1:noop:2'


@pytest.mark.parametrize('signing_key', [None, KEY])
def test_round_trip(signing_key: bytes | None) -> None:
    task = make_task()
    parsed = parse(encode(task, signing_key), signing_key)
    assert parsed == task
    args = step_args(parsed)
    assert args.step_keys_to_execute == ['noop'] and args.should_verify_step


def test_no_pickle_in_the_message() -> None:
    body = encode(make_task(), KEY)
    assert 'ExecuteStepArgs' in json.loads(body)['execute_step_args']  # Dagster serdes JSON


def test_unsigned_message_is_rejected_when_a_key_is_configured() -> None:
    with pytest.raises(InvalidMessage, match='bad signature: message is unsigned'):
        parse(encode(make_task(), None), KEY)


def test_forged_message_is_rejected() -> None:
    fields = json.loads(encode(make_task(), KEY))
    fields['step_key'] = 'other'
    fields['idempotency_key'] = 'run-1:other:0'
    with pytest.raises(InvalidMessage, match='bad signature: HMAC does not match'):
        parse(json.dumps(fields), KEY)
    with pytest.raises(InvalidMessage, match='bad signature'):
        parse(encode(make_task(), b'another key'), KEY)


@pytest.mark.parametrize(
    ('change', 'error'),
    [
        (lambda f: f.pop('run_id'), 'missing field: run_id'),
        (lambda f: f.pop('v'), 'missing field: v'),
        (lambda f: f.update(v=2), 'unknown version: 2'),
        (lambda f: f.update(v=True), 'unknown version: True'),
        (lambda f: f.update(attempt=-1), 'bad field: attempt'),
        (lambda f: f.update(attempt='0'), 'bad field: attempt'),
        (lambda f: f.update(enqueued_at='soon'), 'bad field: enqueued_at'),
        (lambda f: f.update(step_key=''), 'bad field: step_key'),
        (lambda f: f.update(idempotency_key='run-1:noop:9'), 'bad field: idempotency_key'),
        (lambda f: f.update(extra=1), 'unknown field: extra'),
    ],
)
def test_bad_fields_are_named(change: Any, error: str) -> None:
    fields = fields_of(make_task())
    change(fields)
    with pytest.raises(InvalidMessage, match=error):
        parse(json.dumps(fields), None)


@pytest.mark.parametrize(
    ('body', 'error'),
    [
        ('{"v": 1,', 'bad JSON'),
        ('[1, 2]', 'bad JSON: expected an object'),
        ('[' * 100_000, 'bad JSON'),
        ('"' + 'x' * MAX_MESSAGE_BYTES + '"', 'message too large'),
        ('{"v": 1, "x": "\ud800"}', 'bad text'),
    ],
)
def test_bad_bodies_are_named(body: str, error: str) -> None:
    with pytest.raises(InvalidMessage, match=error):
        parse(body, None)


def test_step_args_must_match_the_task() -> None:
    task = make_task()
    other = replace(
        task, execute_step_args=build_task(make_args(1), 'one_op_job', 0).execute_step_args
    )
    with pytest.raises(InvalidMessage, match=r'they run .*run-1:noop:1'):
        step_args(other)
    with pytest.raises(InvalidMessage, match='bad execute_step_args'):
        step_args(replace(task, execute_step_args='{"__class__": "Nope"}'))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(st.text())
def test_fuzz_any_text_raises_only_invalid_message(body: str) -> None:
    with contextlib.suppress(InvalidMessage):
        parse(body, KEY)


@given(st.dictionaries(st.text(max_size=20), json_values, max_size=12))
def test_fuzz_any_object_raises_only_invalid_message(fields: dict[str, Any]) -> None:
    for signing_key in (None, KEY):
        with contextlib.suppress(InvalidMessage):
            parse(json.dumps(fields), signing_key)


@given(
    st.sampled_from(sorted(fields_of(make_task()))),
    json_values,
    st.sampled_from([None, KEY]),
)
def test_fuzz_one_bad_field_raises_only_invalid_message(
    name: str, value: Any, signing_key: bytes | None
) -> None:
    fields = fields_of(make_task())
    fields[name] = value
    try:
        task = parse(json.dumps(fields), signing_key)
    except InvalidMessage:
        return
    with contextlib.suppress(InvalidMessage):
        step_args(task)


def test_the_size_limit_counts_the_attributes_too() -> None:
    """SQS counts attribute names, types and values against its 256 KiB: a body that fits alone
    but not with its attributes is refused before anything is recorded or sent."""
    base = make_task()
    spare = MAX_MESSAGE_BYTES - len(encode(base, None).encode())
    fits_alone = replace(base, job_name=base.job_name + 'x' * (spare - 10))
    assert len(json.dumps(asdict(fits_alone), separators=(',', ':'))) <= MAX_MESSAGE_BYTES
    with pytest.raises(InvalidMessage, match='bytes with its attributes > 262144'):
        encode(fits_alone, None)
    fits = replace(base, job_name=base.job_name + 'x' * (spare - 200))
    assert parse(encode(fits, None), None) == fits
