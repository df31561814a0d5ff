"""Run a demo job as its own process (a run worker), so a test can terminate it like Dagster does.

Usage: python -m tests.e2e.run_job JOB_NAME RUN_CONFIG_JSON TAG
"""

import json
import sys

from dagster import DagsterInstance, execute_job

from tests.e2e.jobs import FAST_RUN_CONFIG, demo_job

if __name__ == '__main__':
    job_name, config, tag = sys.argv[1:]
    with DagsterInstance.get() as instance:
        execute_job(
            demo_job(job_name),
            instance,
            run_config={**FAST_RUN_CONFIG, **json.loads(config)},
            tags={'e2e': tag},
        )
