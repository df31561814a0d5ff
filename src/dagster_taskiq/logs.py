"""Logging: structlog for our events and every stdlib logger (botocore, alembic, dagster) alike.

A service writes one format: JSON lines (`--log-format json`, the default when stderr is not a
terminal) or readable lines on a terminal (`console`). Logger names are kept (`logger`), exceptions
carry their traceback, and every duration (a field ending in `_s`) is rounded to the millisecond.
"""

import logging
import sys
from typing import Literal

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

__all__ = ['FilteringBoundLogger', 'configure_logging', 'get_logger']

DURATION_DECIMALS = 3
# Chatty at INFO (a line per client created, per plugin loaded); their warnings still show
QUIET_LOGGERS = ('botocore', 'aiobotocore', 'urllib3', 'alembic.runtime.plugins')


def round_durations(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for name, value in event_dict.items():
        if name.endswith('_s') and isinstance(value, float):
            event_dict[name] = round(value, DURATION_DECIMALS)
    return event_dict


def configure_logging(
    log_format: Literal['json', 'console'] | None = None, level: str = 'info'
) -> None:
    """Route structlog and the stdlib's loggers to one handler on stderr."""
    numeric_level = logging.getLevelName(level.upper())
    json_lines = log_format == 'json' if log_format else not sys.stderr.isatty()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt='iso', utc=True),
        round_durations,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    renderer: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json_lines
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))


def get_logger(name: str) -> FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
