-- verify's reads. Every statement works on the runs in the temporary table `scope` (made first):
-- one scenario's submissions, or every run in Dagster's storage. Dagster's tables (runs,
-- event_logs) and the store's (step_executions, execution_log, step_effects, scaling_events)
-- share the stack's database.

-- name: scope_all
CREATE TEMPORARY TABLE scope ON COMMIT DROP AS SELECT run_id FROM runs

-- name: scope_scenario
CREATE TEMPORARY TABLE scope ON COMMIT DROP AS
SELECT run_id FROM load_submissions WHERE scenario_id = :scenario_id

-- name: window
-- The scaling timeline's span: from the first submission (or attempt) in scope to the end of its
-- last run (now, while one is still going).
SELECT least(
  (SELECT min(submitted_at) FROM load_submissions JOIN scope USING (run_id)),
  (SELECT min(enqueued_at) FROM step_executions JOIN scope USING (run_id))
) AS since,
CASE WHEN EXISTS (SELECT 1 FROM runs JOIN scope USING (run_id) WHERE end_time IS NULL)
  THEN clock_timestamp()
  ELSE (SELECT to_timestamp(max(end_time)) FROM runs JOIN scope USING (run_id))
END AS until

-- name: runs_by_status
SELECT r.status, count(*) AS runs FROM runs r JOIN scope USING (run_id) GROUP BY 1 ORDER BY 1

-- name: counts
SELECT
  (SELECT count(*) FROM scope) AS runs,
  (SELECT count(*) FROM (SELECT DISTINCT run_id, step_key FROM step_executions
                         JOIN scope USING (run_id)) AS steps) AS steps,
  (SELECT count(*) FROM step_executions JOIN scope USING (run_id)) AS attempts,
  (SELECT count(*) FROM execution_log JOIN scope USING (run_id)) AS executions,
  (SELECT coalesce(sum(refused_count), 0) FROM step_executions JOIN scope USING (run_id))
    AS duplicate_deliveries_refused,
  (SELECT count(*) FROM step_executions JOIN scope USING (run_id) WHERE state = 'ABANDONED')
    AS attempts_abandoned,
  (SELECT count(*) FROM step_executions JOIN scope USING (run_id) WHERE attempt > 0)
    AS attempts_retried,
  (SELECT count(*) FROM step_executions JOIN scope USING (run_id) WHERE state = 'FAILED')
    AS attempts_failed

-- name: duplicate_executions
-- Two starts of one attempt key (execution_log has no unique key, on purpose), or two attempts of
-- one step both COMPLETED.
SELECT run_id, step_key, 'attempt ' || attempt || ' started ' || count(*) || ' times' AS what
FROM execution_log JOIN scope USING (run_id)
GROUP BY run_id, step_key, attempt HAVING count(*) > 1
UNION ALL
SELECT run_id, step_key,
       'attempts ' || string_agg(attempt::text, ', ' ORDER BY attempt) || ' all COMPLETED'
FROM step_executions JOIN scope USING (run_id) WHERE state = 'COMPLETED'
GROUP BY run_id, step_key HAVING count(*) > 1
ORDER BY 1, 2

-- name: overlapping_attempts
-- User code of two attempts of one step running at once, from the demo ops' own rows: an attempt
-- that never recorded its end died at most :alive_interval_s after it last said it was alive.
SELECT a.run_id, a.step_key,
       'attempts ' || a.attempt || ' (' || coalesce(a.worker, '?') || ') and ' || b.attempt
         || ' (' || coalesce(b.worker, '?') || ') overlapped by '
         || round(extract(epoch FROM least(a.until, b.until) - b.begun_at)::numeric, 3) || ' s'
         AS what
FROM (SELECT *, coalesce(ended_at, alive_at + make_interval(secs => :alive_interval_s)) AS until
      FROM demo_op_runs) AS a
JOIN (SELECT *, coalesce(ended_at, alive_at + make_interval(secs => :alive_interval_s)) AS until
      FROM demo_op_runs) AS b
  ON a.run_id = b.run_id AND a.step_key = b.step_key AND a.attempt < b.attempt
JOIN scope ON scope.run_id = a.run_id
WHERE b.begun_at < a.until AND a.begun_at < b.until
ORDER BY 1, 2

-- name: disagreements
-- Per step: Dagster's STEP_SUCCESS events against the store's COMPLETED attempts (each must be
-- the other's count, at most one), and a step of a successful run without exactly one success.
WITH dagster AS (
  SELECT run_id, step_key, count(*) AS successes FROM event_logs JOIN scope USING (run_id)
  WHERE dagster_event_type = 'STEP_SUCCESS' AND step_key IS NOT NULL GROUP BY 1, 2
), store AS (
  SELECT run_id, step_key, count(*) FILTER (WHERE state = 'COMPLETED') AS completed
  FROM step_executions JOIN scope USING (run_id) GROUP BY 1, 2
)
SELECT run_id, step_key,
       'Dagster has ' || coalesce(d.successes, 0) || ' STEP_SUCCESS, the store '
         || coalesce(s.completed, 0) || ' COMPLETED attempt(s)'
         || CASE WHEN r.status = 'SUCCESS' THEN ' (run SUCCESS)' ELSE '' END AS what
FROM dagster d FULL JOIN store s USING (run_id, step_key)
JOIN runs r USING (run_id)
WHERE coalesce(d.successes, 0) <> coalesce(s.completed, 0)
   OR (r.status = 'SUCCESS' AND coalesce(d.successes, 0) <> 1)
ORDER BY 1, 2

-- name: effect_problems
-- The outbox: one effect per COMPLETED attempt of an op that records one (:effect_steps, as
-- 'job/step' names), none for any other attempt, never two of one name for one attempt.
WITH completed AS (
  SELECT e.idempotency_key, e.run_id, e.step_key, r.pipeline_name || '/' || e.step_key AS op
  FROM step_executions e JOIN scope USING (run_id) JOIN runs r USING (run_id)
  WHERE e.state = 'COMPLETED'
), effects AS (
  SELECT idempotency_key, run_id, step_key, name, count(*) AS n
  FROM step_effects JOIN scope USING (run_id) GROUP BY 1, 2, 3, 4
)
SELECT c.run_id, c.step_key, 'missing effect of ' || c.idempotency_key AS what
FROM completed c
WHERE c.op = ANY(:effect_steps)
  AND NOT EXISTS (SELECT 1 FROM effects f WHERE f.idempotency_key = c.idempotency_key)
UNION ALL
SELECT run_id, step_key, n || ' effects "' || name || '" of ' || idempotency_key
FROM effects WHERE n > 1
UNION ALL
SELECT f.run_id, f.step_key, 'effect "' || f.name || '" of ' || f.idempotency_key
  || ', which is ' || coalesce(e.state, 'unknown to the store')
FROM effects f LEFT JOIN step_executions e USING (idempotency_key)
WHERE e.state IS DISTINCT FROM 'COMPLETED'
ORDER BY 1, 2

-- name: lost_steps
-- A step of a successful run that started in Dagster without a COMPLETED attempt in the store.
SELECT DISTINCT l.run_id, l.step_key, 'no COMPLETED attempt in the store' AS what
FROM event_logs l JOIN scope USING (run_id) JOIN runs r USING (run_id)
WHERE r.status = 'SUCCESS' AND l.dagster_event_type = 'STEP_START'
  AND NOT EXISTS (SELECT 1 FROM step_executions e WHERE e.run_id = l.run_id
                  AND e.step_key = l.step_key AND e.state = 'COMPLETED')
ORDER BY 1, 2

-- name: stranded
-- Work nobody will finish: a run not ended with nothing QUEUED or RUNNING for it (older than
-- :settle_s), an attempt RUNNING past its lease by more than :settle_s, and an attempt still
-- QUEUED or RUNNING in a run that has ended.
SELECT r.run_id, '' AS step_key,
       'run ' || r.status || ' with nothing queued or running' AS what
FROM runs r JOIN scope USING (run_id)
WHERE r.status IN ('QUEUED', 'NOT_STARTED', 'STARTING', 'STARTED', 'CANCELING')
  AND r.update_timestamp < (now() AT TIME ZONE 'UTC') - make_interval(secs => :settle_s)
  AND NOT EXISTS (SELECT 1 FROM step_executions e WHERE e.run_id = r.run_id
                  AND e.state IN ('QUEUED', 'RUNNING'))
  AND NOT EXISTS (SELECT 1 FROM event_logs l WHERE l.run_id = r.run_id AND l.timestamp
                  > (now() AT TIME ZONE 'UTC') - make_interval(secs => :settle_s))
UNION ALL
SELECT run_id, step_key, 'attempt ' || attempt || ' RUNNING, its lease expired at '
  || lease_expires_at
FROM step_executions JOIN scope USING (run_id)
WHERE state = 'RUNNING' AND lease_expires_at < now() - make_interval(secs => :settle_s)
UNION ALL
SELECT e.run_id, e.step_key, 'attempt ' || e.attempt || ' ' || e.state || ' in a run ' || r.status
FROM step_executions e JOIN scope USING (run_id) JOIN runs r USING (run_id)
WHERE e.state IN ('QUEUED', 'RUNNING') AND r.status IN ('SUCCESS', 'FAILURE', 'CANCELED')
ORDER BY 1, 2

-- name: latencies
-- Seconds: queue wait (enqueued to claimed) and execution (claimed to finished) per attempt.
SELECT extract(epoch FROM e.started_at - e.enqueued_at) AS queue_wait_s,
       extract(epoch FROM l.ended_at - l.started_at) AS execution_s
FROM step_executions e JOIN scope USING (run_id)
LEFT JOIN execution_log l ON l.idempotency_key = e.idempotency_key AND l.outcome = 'COMPLETED'
WHERE e.started_at IS NOT NULL

-- name: failovers
-- For each attempt a fault (kill, freeze, partition) caught running: the fault, to its retry's
-- start on any worker.
SELECT f.kind, f.target, e.run_id, e.step_key, e.attempt,
       extract(epoch FROM retry.started_at - f.at) AS failover_s
FROM load_faults f
JOIN execution_log e ON e.worker_id = f.target AND e.started_at <= f.at
  AND (e.ended_at IS NULL OR e.ended_at > f.at)
JOIN scope ON scope.run_id = e.run_id
JOIN step_executions retry ON retry.run_id = e.run_id AND retry.step_key = e.step_key
  AND retry.attempt = e.attempt + 1 AND retry.started_at IS NOT NULL
WHERE f.scenario_id IN (SELECT DISTINCT scenario_id FROM load_submissions JOIN scope USING (run_id))

-- name: faults
SELECT f.kind, f.target, f.detail, f.at, f.ended_at FROM load_faults f
WHERE f.scenario_id IN (SELECT DISTINCT scenario_id FROM load_submissions JOIN scope USING (run_id))
ORDER BY f.at

-- name: scaling_timeline
SELECT at, visible, in_flight, running, desired, reason FROM scaling_events
WHERE at BETWEEN :since AND :until ORDER BY at

-- name: failure_times
-- When attempts were abandoned and runs failed, for the chart.
SELECT e.ended_at AS at FROM step_executions e JOIN scope USING (run_id)
WHERE e.state = 'ABANDONED' AND e.ended_at IS NOT NULL
UNION ALL
SELECT to_timestamp(r.end_time) FROM runs r JOIN scope USING (run_id)
WHERE r.status = 'FAILURE' AND r.end_time IS NOT NULL
ORDER BY 1
