"""dagster-taskiq: run every step of a Dagster run on async SQS workers, exactly once.

    from dagster_taskiq import taskiq_executor, record_effect

Both are imported on first use, so `import dagster_taskiq.cli` (and `dagster-taskiq --help`) does
not import dagster.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_taskiq.executor import taskiq_executor
    from dagster_taskiq.step_process import record_effect

__all__ = ['record_effect', 'taskiq_executor']

_PUBLIC = {
    'taskiq_executor': 'dagster_taskiq.executor',
    'record_effect': 'dagster_taskiq.step_process',
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
