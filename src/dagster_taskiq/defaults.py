"""Every default, once: light enough for `--help` (it imports nothing)."""

import os
from pathlib import Path

DEFAULT_QUEUE_NAME = 'dagster-taskiq-steps'
DEFAULT_ECS_CLUSTER = 'dagster-taskiq-local'
DEFAULT_WORKER_SERVICE = 'taskiq-worker'
DEFAULT_REGION = 'us-east-1'
DEFAULT_DATABASE_URL = 'postgresql://postgres@127.0.0.1:5432/postgres'
DEFAULT_VISIBILITY_TIMEOUT_S = 60
DEFAULT_MAX_RECEIVE_COUNT = 10
DEFAULT_LEASE_S = 30.0
# An expired lease is abandoned (and the step retried) only this long after it expired: time for
# its owner to have stopped the step (it kills it before expiry; this covers a slow kill)
DEFAULT_ABANDON_GRACE_S = 2.0
DEFAULT_STORE_CALL_TIMEOUT_S = 10.0  # no database call waits longer, whatever the network does
DEFAULT_RETRY_BASE_S = 1.0
DEFAULT_RETRY_MAX_S = 16.0
DEFAULT_RETRY_ATTEMPTS = 6  # one call and 5 retries, waits capped at 1, 2, 4, 8, 16 s
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN_S = 30.0
# The worker's and the auto-scaler's options (flags and DAGSTER_TASKIQ_* variables: cli.py)
DEFAULT_CONCURRENCY = 4
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_POLL_WAIT_S = 20
# Outcomes the database could not take wait here: an absolute path (not the working directory's);
# on ECS, a volume that outlives the task (EFS) lets another worker write them
DEFAULT_JOURNAL_DIR = (
    Path(os.environ.get('XDG_STATE_HOME') or Path.home() / '.local' / 'state')
    / 'dagster-taskiq'
    / 'journal'
)
DEFAULT_MIN_WORKERS = 0
DEFAULT_MAX_WORKERS = 10
DEFAULT_TARGET_BACKLOG_PER_WORKER = 4
DEFAULT_POLL_INTERVAL_S = 5.0
DEFAULT_SCALE_DOWN_STABILISATION_S = 60.0
DEFAULT_ACTIVATION_THRESHOLD = 1

LOG_FORMATS = ('json', 'console')
LOG_LEVELS = ('debug', 'info', 'warning', 'error')
