"""Wait on a condition with a deadline: the only way tests synchronise with what they started."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

POLL_S = 0.05


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = 'condition'
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not met within {timeout_s} s')
        await asyncio.sleep(POLL_S)


def wait_until(
    condition: Callable[[], Any], timeout_s: float = 30.0, what: str = 'condition'
) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not met within {timeout_s} s')
        time.sleep(POLL_S)
