"""Reading the services' JSON logs in tests, by event name.

Every check goes through `events`, which refuses an event name that no code under src/ logs, so
a renamed event fails the test that looks for it instead of making an absence check pass.
"""

import ast
import json
from functools import cache
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / 'src'
# a logging call -> the position of its event argument
LOG_METHODS = {'debug': 0, 'info': 0, 'warning': 0, 'error': 0, 'exception': 0, 'log_step': 2}


def _strings(node: ast.AST | None) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)} if node else set()


@cache
def known_events() -> frozenset[str]:
    """Event names in src/: the event argument of every log call, and every `event = ...`."""
    found: set[str] = set()
    for path in SRC.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                position = LOG_METHODS.get(name)
                if position is not None and len(node.args) > position:
                    found |= _strings(node.args[position])
            elif (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant | ast.IfExp)
                and any(isinstance(t, ast.Name) and t.id == 'event' for t in node.targets)
            ):
                found |= _strings(node.value)
    return frozenset(name for name in found if isinstance(name, str))


def events(log: str | Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `event` in `log` (a log's text or its file)."""
    if event not in known_events():
        raise AssertionError(f'no code logs an event named {event!r}')
    text = log.read_text() if isinstance(log, Path) else log
    entries = (json.loads(line) for line in text.splitlines() if line.startswith('{'))
    return [entry for entry in entries if entry.get('event') == event]
