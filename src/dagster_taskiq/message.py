"""The step message (`OpExecutionTask`): build, sign, parse, verify.

A message is one JSON object: the task's fields plus `sig`, the hex HMAC-SHA256 of the canonical
JSON of every other field, present when a signing key is configured. `execute_step_args` is
Dagster's own serdes string of `ExecuteStepArgs`; nothing is ever pickled.
"""

import hashlib
import hmac
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from dagster._core.instance.ref import InstanceRef
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import deserialize_value, serialize_value

from dagster_taskiq.errors import InvalidMessage

MESSAGE_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024  # SQS's own limit
SIGNATURE_FIELD = 'sig'
_STRING_FIELDS = ('idempotency_key', 'run_id', 'job_name', 'step_key', 'execute_step_args')


@dataclass(frozen=True)
class OpExecutionTask:
    v: int
    idempotency_key: str
    run_id: str
    job_name: str
    step_key: str
    attempt: int
    enqueued_at: float  # seconds since the epoch, when the executor sent it
    execute_step_args: str


def attempt_key(run_id: str, step_key: str, attempt: int) -> str:
    return f'{run_id}:{step_key}:{attempt}'


def step_identity(args: ExecuteStepArgs) -> tuple[str, int, str]:
    """(step_key, attempt, idempotency_key) of the one step that `args` executes."""
    step_keys = args.step_keys_to_execute or []
    if len(step_keys) != 1:
        raise InvalidMessage(f'step args must name exactly one step, not {len(step_keys)}')
    step_key = step_keys[0]
    attempt = (
        args.known_state.get_retry_state().get_attempt_count(step_key) if args.known_state else 0
    )
    return step_key, attempt, attempt_key(args.run_id, step_key, attempt)


def build_task(args: ExecuteStepArgs, job_name: str, enqueued_at: float) -> OpExecutionTask:
    step_key, attempt, key = step_identity(args)
    return OpExecutionTask(
        v=MESSAGE_VERSION,
        idempotency_key=key,
        run_id=args.run_id,
        job_name=job_name,
        step_key=step_key,
        attempt=attempt,
        enqueued_at=enqueued_at,
        execute_step_args=serialize_value(args),
    )


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(',', ':')).encode()


def _signature(fields: dict[str, Any], signing_key: bytes) -> str:
    return hmac.new(signing_key, _canonical(fields), hashlib.sha256).hexdigest()


def attributes(task: OpExecutionTask) -> dict[str, str | int]:
    """The SQS message attributes of the task's message (for filtering and tracing)."""
    return {'run_id': task.run_id, 'step_key': task.step_key, 'attempt': task.attempt}


def encode(task: OpExecutionTask, signing_key: bytes | None) -> str:
    """The message body; InvalidMessage when body and attributes pass SQS's size limit."""
    fields = asdict(task)
    if signing_key is not None:
        fields[SIGNATURE_FIELD] = _signature(fields, signing_key)
    body = json.dumps(fields, separators=(',', ':'))
    # SQS counts each attribute's name, data type and value against the limit too
    extra = sum(len(f'{name}String{value}'.encode()) for name, value in attributes(task).items())
    size = len(body.encode()) + extra
    if size > MAX_MESSAGE_BYTES:
        limit = MAX_MESSAGE_BYTES
        raise InvalidMessage(f'message too large: {size} bytes with its attributes > {limit}')
    return body


def _load_object(body: str) -> dict[str, Any]:
    try:
        size = len(body.encode())
    except UnicodeEncodeError as error:
        raise InvalidMessage(f'bad text: not UTF-8 encodable ({error.reason})') from error
    if size > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f'message too large: {size} bytes > {MAX_MESSAGE_BYTES}')
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise InvalidMessage(f'bad JSON: {error}') from error
    if not isinstance(fields, dict):
        raise InvalidMessage(f'bad JSON: expected an object, got {type(fields).__name__}')
    return fields


def _verify_signature(fields: dict[str, Any], signing_key: bytes) -> None:
    signature = fields.pop(SIGNATURE_FIELD, None)
    if signature is None:
        raise InvalidMessage('bad signature: message is unsigned but a signing key is configured')
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature.encode(errors='replace'), _signature(fields, signing_key).encode()
    ):
        raise InvalidMessage('bad signature: HMAC does not match the message')


def _check_fields(fields: dict[str, Any]) -> OpExecutionTask:
    for name in _STRING_FIELDS:
        if name not in fields:
            raise InvalidMessage(f'missing field: {name}')
        if not isinstance(fields[name], str) or not fields[name]:
            raise InvalidMessage(f'bad field: {name} must be a non-empty string')
    for name in ('attempt', 'enqueued_at'):
        if name not in fields:
            raise InvalidMessage(f'missing field: {name}')
    attempt, enqueued_at = fields['attempt'], fields['enqueued_at']
    if type(attempt) is not int or attempt < 0:
        raise InvalidMessage('bad field: attempt must be a non-negative integer')
    if type(enqueued_at) not in (int, float) or not math.isfinite(enqueued_at):
        raise InvalidMessage('bad field: enqueued_at must be a finite number')
    unknown = sorted(set(fields) - {*_STRING_FIELDS, 'v', 'attempt', 'enqueued_at'})
    if unknown:
        raise InvalidMessage(f'unknown field: {", ".join(unknown)}')
    task = OpExecutionTask(**{**fields, 'enqueued_at': float(enqueued_at)})
    expected_key = attempt_key(task.run_id, task.step_key, task.attempt)
    if task.idempotency_key != expected_key:
        raise InvalidMessage(
            f'bad field: idempotency_key {task.idempotency_key!r} is not {expected_key!r}'
        )
    return task


def parse(body: str, signing_key: bytes | None) -> OpExecutionTask:
    """The task in `body`, or `InvalidMessage` naming what was wrong. Never raises anything else."""
    fields = _load_object(body)
    if 'v' not in fields:
        raise InvalidMessage('missing field: v')
    if fields['v'] != MESSAGE_VERSION or type(fields['v']) is not int:
        raise InvalidMessage(
            f'unknown version: {fields["v"]!r} (this worker reads {MESSAGE_VERSION})'
        )
    if signing_key is not None:
        _verify_signature(fields, signing_key)
    else:
        fields.pop(SIGNATURE_FIELD, None)
    return _check_fields(fields)


def step_args(task: OpExecutionTask) -> ExecuteStepArgs:
    """The Dagster step args the task carries, checked against the task's own run and step."""
    try:
        args = deserialize_value(task.execute_step_args, ExecuteStepArgs)
    except Exception as error:  # serdes raises several types for bad input: all mean a bad message
        raise InvalidMessage(f'bad execute_step_args: {error}') from error
    key = step_identity(args)[2]
    if (args.run_id, key) != (task.run_id, task.idempotency_key):
        raise InvalidMessage(
            f'bad execute_step_args: they run {key!r}, the message says {task.idempotency_key!r}'
        )
    return args


# Where a Dagster instance keeps its runs and events: two instances with the same storage are the
# same instance to a step, whatever their other settings or their home's path
InstanceStorage = tuple[object, object] | None


def instance_storage(ref: InstanceRef | None) -> InstanceStorage:
    return None if ref is None else (ref.run_storage_data, ref.event_storage_data)


def check_instance(args: ExecuteStepArgs, storage: InstanceStorage) -> None:
    """InvalidMessage unless `args` name the Dagster instance whose storage is `storage`."""
    named = instance_storage(args.instance_ref)
    if named != storage:
        classes = 'none' if named is None else ', '.join(type_name(data) for data in named)
        raise InvalidMessage(
            f'foreign instance: the message names a Dagster instance ({classes}) whose storage '
            "is not this worker's (DAGSTER_HOME)"
        )


def type_name(data: object) -> str:
    return str(getattr(data, 'class_name', type(data).__name__))
