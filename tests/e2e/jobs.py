"""The demo jobs as e2e tests run them (no fixtures here: `run_job` imports it in a subprocess)."""

import os
from typing import Any

from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

DEFINITIONS_MODULE = 'dagster_taskiq_demo.definitions'
FAST_RUN_CONFIG: dict[str, Any] = {
    'execution': {'config': {'check_step_health_interval_seconds': 1}}
}


def demo_job(name: str) -> ReconstructableJob:
    """A demo job as its Definitions bind it (IO manager included), loadable by module name."""
    repository = ReconstructableRepository.for_module(DEFINITIONS_MODULE, 'defs', os.getcwd())
    return repository.get_reconstructable_job(name)
