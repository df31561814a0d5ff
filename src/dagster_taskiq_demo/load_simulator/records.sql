-- The load simulator's own tables (the demo's, not the library's schema: created on first use).
-- Every run a scenario submitted, and every fault it injected, for `verify`.

-- name: create_tables
CREATE TABLE IF NOT EXISTS load_submissions (
  scenario_id text NOT NULL, run_id text PRIMARY KEY, job_name text NOT NULL,
  submitted_at timestamptz NOT NULL DEFAULT clock_timestamp(), seed bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS load_faults (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, scenario_id text NOT NULL,
  kind text NOT NULL, target text NOT NULL, detail text NOT NULL DEFAULT '',
  at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz
)

-- name: record_submission
INSERT INTO load_submissions (scenario_id, run_id, job_name, seed)
VALUES (:scenario_id, :run_id, :job_name, :seed)

-- name: record_fault
INSERT INTO load_faults (scenario_id, kind, target, detail)
VALUES (:scenario_id, :kind, :target, :detail)
RETURNING id

-- name: fault_ended
UPDATE load_faults SET ended_at = clock_timestamp() WHERE id = :id
