-- Named statements of the idempotency store. Each starts with a line `-- name: <name>`.
-- Times come from the database's clock (now()), so workers' clocks never decide a lease.

-- name: record_enqueued
-- Nothing is recorded while the run is stopping. The run's row in Dagster's runs table (same
-- database) is share-locked, so the update that marks the run CANCELING waits for this launch
-- to commit: every launch commits before the run is CANCELING, or sees it and records nothing.
WITH run AS (
  SELECT status FROM runs WHERE run_id = :run_id FOR SHARE
), inserted AS (
  INSERT INTO step_executions (idempotency_key, run_id, job_name, step_key, attempt, state)
  SELECT :key, :run_id, :job_name, :step_key, :attempt, 'QUEUED'
  WHERE NOT EXISTS (SELECT 1 FROM run WHERE status = ANY(:stopping))
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING idempotency_key
)
SELECT (SELECT status FROM run) AS run_status, EXISTS (SELECT 1 FROM inserted) AS recorded

-- name: claim
-- Wins only for a QUEUED key; the winner's start is logged in the same statement.
WITH claimed AS (
  UPDATE step_executions
  SET state = 'RUNNING',
      owner = :worker_id,
      lease_token = nextval('lease_token_seq'),
      lease_expires_at = now() + make_interval(secs => :lease_s),
      started_at = now(),
      delivery_count = delivery_count + 1
  WHERE idempotency_key = :key AND state = 'QUEUED'
  RETURNING idempotency_key, run_id, step_key, attempt, owner, lease_token, lease_expires_at
), logged AS (
  INSERT INTO execution_log (idempotency_key, run_id, step_key, attempt, worker_id, lease_token)
  SELECT idempotency_key, run_id, step_key, attempt, owner, lease_token FROM claimed
)
SELECT lease_token, lease_expires_at FROM claimed

-- name: reclaim
-- A worker's own RUNNING attempt that it is not running: its claim committed but the answer was
-- lost (a connection cut at COMMIT), or it is the same worker id restarted (the step processes
-- of its previous process died with it). A new token; the start the lost claim logged, under
-- which no user code ran, moves to it.
WITH previous AS (
  SELECT idempotency_key, lease_token FROM step_executions
  WHERE idempotency_key = :key AND state = 'RUNNING' AND owner = :worker_id
  FOR UPDATE
), reclaimed AS (
  UPDATE step_executions AS execution
  SET lease_token = nextval('lease_token_seq'),
      lease_expires_at = now() + make_interval(secs => :lease_s)
  FROM previous
  WHERE execution.idempotency_key = previous.idempotency_key
  RETURNING execution.idempotency_key, execution.lease_token, execution.lease_expires_at,
            previous.lease_token AS previous_token
), relogged AS (
  UPDATE execution_log AS log
  SET lease_token = reclaimed.lease_token
  FROM reclaimed
  WHERE log.idempotency_key = reclaimed.idempotency_key
    AND log.lease_token = reclaimed.previous_token
)
SELECT lease_token, lease_expires_at FROM reclaimed

-- name: refuse
-- A delivery that lost the claim: count it and say why.
UPDATE step_executions
SET delivery_count = delivery_count + 1, refused_count = refused_count + 1
WHERE idempotency_key = :key
RETURNING state, owner, lease_token, lease_expires_at, lease_expires_at <= now() AS lease_expired,
          lease_expires_at + make_interval(secs => :grace_s) <= now() AS abandonable

-- name: heartbeat
UPDATE step_executions
SET lease_expires_at = now() + make_interval(secs => :lease_s)
WHERE idempotency_key = :key AND lease_token = :token AND state = 'RUNNING'
RETURNING lease_expires_at

-- name: finish
-- One statement, run on its own (autocommit): the fenced end of the attempt, its outbox effects
-- and Dagster's terminal event of the attempt (when the step process produced one) commit
-- together or not at all, so Dagster records STEP_SUCCESS exactly when the store says COMPLETED.
-- The event row is built as dagster-postgres's store_event builds it (its NOTIFY included); it
-- takes its id, and so its place in the run's event stream, just before the statement commits.
-- The run's own channel of step ends (run_events.step_ends_channel) wakes its executor loop.
WITH finished AS (
  UPDATE step_executions
  SET state = :outcome, ended_at = now(), error = :error
  WHERE idempotency_key = :key AND lease_token = :token AND state = 'RUNNING'
  RETURNING idempotency_key, run_id, step_key, lease_token, state
), closed AS (
  UPDATE execution_log AS log
  SET outcome = finished.state, ended_at = now(), error = :error
  FROM finished
  WHERE log.idempotency_key = finished.idempotency_key AND log.lease_token = finished.lease_token
), effects AS (
  INSERT INTO step_effects (idempotency_key, run_id, step_key, name, payload)
  SELECT finished.idempotency_key, finished.run_id, finished.step_key, effect ->> 'name',
         effect -> 'payload'
  FROM finished, jsonb_array_elements(CAST(:effects AS jsonb)) AS effect
), event AS (
  INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key)
  SELECT finished.run_id, CAST(:event AS text), CAST(:event_type AS text),
         to_timestamp(CAST(:event_timestamp AS double precision)) AT TIME ZONE 'UTC',
         finished.step_key
  FROM finished
  WHERE CAST(:event AS text) IS NOT NULL
  RETURNING run_id, id
)
SELECT finished.state, (SELECT pg_notify('run_events', run_id || '_' || id) FROM event),
       (SELECT pg_notify('dagster_taskiq_step_ends_' || md5(run_id), run_id) FROM event)
FROM finished

-- name: cancelled_event
-- A cancelled attempt's own terminal failure (Dagster's interrupt), written by its worker once the
-- attempt is CANCELLED under its token; never a success, which the store says did not happen.
WITH event AS (
  INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key)
  SELECT run_id, CAST(:event AS text), CAST(:event_type AS text),
         to_timestamp(CAST(:event_timestamp AS double precision)) AT TIME ZONE 'UTC', step_key
  FROM step_executions
  WHERE idempotency_key = :key AND lease_token = :token AND state = 'CANCELLED'
    AND CAST(:event_type AS text) <> 'STEP_SUCCESS'
  RETURNING run_id, id
)
SELECT pg_notify('run_events', run_id || '_' || id),
       pg_notify('dagster_taskiq_step_ends_' || md5(run_id), run_id)
FROM event

-- name: abandon
-- Only a RUNNING attempt whose lease expired more than the grace ago (its owner has had time to
-- stop the step), fenced on the token the caller saw.
WITH abandoned AS (
  UPDATE step_executions
  SET state = 'ABANDONED', ended_at = now(),
      error = format('lease of worker %s (token %s) expired at %s', owner, lease_token, lease_expires_at)
  WHERE idempotency_key = :key AND lease_token = :token AND state = 'RUNNING'
    AND lease_expires_at + make_interval(secs => :grace_s) <= now()
  RETURNING idempotency_key, lease_token, error
), closed AS (
  UPDATE execution_log AS log
  SET outcome = 'ABANDONED', ended_at = now(), error = abandoned.error
  FROM abandoned
  WHERE log.idempotency_key = abandoned.idempotency_key AND log.lease_token = abandoned.lease_token
)
SELECT error FROM abandoned

-- name: cancel
-- Then close_cancelled_start, as a statement of its own in the same transaction: a claim that
-- committed while this one waited on the row is not in this statement's snapshot.
UPDATE step_executions
SET state = 'CANCELLED', ended_at = now(), error = :reason
WHERE idempotency_key = :key AND state = ANY(:states)
RETURNING idempotency_key, lease_token

-- name: close_cancelled_start
UPDATE execution_log
SET outcome = 'CANCELLED', ended_at = now()
WHERE idempotency_key = :key AND lease_token = :token AND outcome IS NULL

-- name: get_executions
SELECT *, lease_expires_at <= now() AS lease_expired,
       lease_expires_at + make_interval(secs => :grace_s) <= now() AS abandonable,
       extract(epoch FROM now() - enqueued_at) AS age_s
FROM step_executions
WHERE idempotency_key = ANY(:keys)

-- name: list_executions
SELECT *, lease_expires_at <= now() AS lease_expired
FROM step_executions
WHERE run_id = :run_id
ORDER BY enqueued_at, idempotency_key

-- name: list_log
SELECT * FROM execution_log WHERE run_id = :run_id ORDER BY id

-- name: list_effects
SELECT * FROM step_effects WHERE run_id = :run_id ORDER BY id

-- name: worker_seen
INSERT INTO workers (worker_id, concurrency, running)
VALUES (:worker_id, :concurrency, :running)
ON CONFLICT (worker_id) DO UPDATE
SET running = EXCLUDED.running, last_seen_at = now(), stopped_at = NULL

-- name: worker_stopped
UPDATE workers SET running = 0, stopped_at = now(), last_seen_at = now()
WHERE worker_id = :worker_id

-- name: live_workers
SELECT count(*) AS workers, coalesce(sum(concurrency), 0) AS slots, coalesce(sum(running), 0) AS running
FROM workers
WHERE stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => :within_s)

-- name: expire_lease
-- A draining worker releases an attempt it will not finish: the lease ends now (fenced).
UPDATE step_executions
SET lease_expires_at = now()
WHERE idempotency_key = :key AND lease_token = :token AND state = 'RUNNING'
RETURNING idempotency_key

-- name: record_scaling_event
INSERT INTO scaling_events
  (cluster, service, visible, in_flight, delayed, running, desired_before, recommendation, desired, reason)
VALUES
  (:cluster, :service, :visible, :in_flight, :delayed, :running, :desired_before, :recommendation, :desired, :reason)

-- name: list_scaling_events
SELECT * FROM scaling_events WHERE service = :service ORDER BY at, id

-- name: schema_version
SELECT version_num FROM dagster_taskiq_alembic_version

-- name: reap_expired
-- Every RUNNING attempt whose lease expired more than the grace ago, whoever owned it: the run
-- worker that would abandon it through its health check may be gone too. Same effect as abandon.
WITH abandoned AS (
  UPDATE step_executions
  SET state = 'ABANDONED', ended_at = now(),
      error = format('lease of worker %s (token %s) expired at %s (reaped)', owner, lease_token, lease_expires_at)
  WHERE state = 'RUNNING' AND lease_expires_at + make_interval(secs => :grace_s) <= now()
  RETURNING idempotency_key, lease_token, error
), closed AS (
  UPDATE execution_log AS log
  SET outcome = 'ABANDONED', ended_at = now(), error = abandoned.error
  FROM abandoned
  WHERE log.idempotency_key = abandoned.idempotency_key AND log.lease_token = abandoned.lease_token
)
SELECT idempotency_key FROM abandoned

-- name: cancel_run
-- Every attempt of a run still queued or running; then close_cancelled_starts_of_run, as a
-- statement of its own (see cancel).
UPDATE step_executions
SET state = 'CANCELLED', ended_at = now(), error = :reason
WHERE run_id = :run_id AND state IN ('QUEUED', 'RUNNING')
RETURNING idempotency_key

-- name: close_cancelled_starts_of_run
UPDATE execution_log AS log
SET outcome = 'CANCELLED', ended_at = now()
FROM step_executions AS attempt
WHERE log.run_id = :run_id AND log.outcome IS NULL
  AND attempt.idempotency_key = log.idempotency_key AND attempt.lease_token = log.lease_token
  AND attempt.state = 'CANCELLED'

-- name: dagster_tables
-- Dagster's tables that the store reads or writes: `finish` writes the attempt's terminal event
-- to event_logs, `record_enqueued` reads the run's status in runs.
SELECT to_regclass('event_logs') AS event_logs, to_regclass('runs') AS runs

-- name: ping
SELECT 1 AS answered
