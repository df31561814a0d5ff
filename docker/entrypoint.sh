#!/bin/sh
# The image's entry point: `entrypoint ROLE [OPTIONS]`, ROLE one of webserver, daemon, worker,
# autoscaler; OPTIONS go to the role's command. Settings come from the environment (DATABASE_URL,
# DAGSTER_TASKIQ_*: README "Configuration"), as the task definitions give them.
set -eu
if [ -n "${DATABASE_URL:-}" ]; then
  # Dagster's storage (docker/dagster.yaml) takes the psycopg2 driver's URL: SQLAlchemy 2.1 maps
  # a plain postgresql:// to psycopg 3, which dagster-postgres does not use
  DAGSTER_POSTGRES_URL="postgresql+psycopg2://${DATABASE_URL#*://}"
  export DAGSTER_POSTGRES_URL
fi
role="${1:-}"
if [ $# -gt 0 ]; then
  shift
fi
case "$role" in
  webserver) exec dagster-webserver --host 0.0.0.0 --port 3000 -w /opt/dagster/workspace.yaml "$@" ;;
  # the daemon starts first and once: it applies the store's migrations (idempotent) before running
  daemon) dagster-taskiq db upgrade && exec dagster-daemon run -w /opt/dagster/workspace.yaml "$@" ;;
  worker) exec dagster-taskiq worker "$@" ;;
  autoscaler) exec dagster-taskiq autoscaler "$@" ;;
  *)
    echo "usage: entrypoint webserver|daemon|worker|autoscaler [options] (got '$role')" >&2
    exit 64
    ;;
esac
