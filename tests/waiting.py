"""Wait on a condition with a deadline: the only way tests synchronise with what they started."""

import asyncio
import time
from collections.abc import Awaitable, Callable

from dagster_taskiq_demo.stack import wait_for as wait_until  # the sync twin of `eventually`

__all__ = ['eventually', 'wait_until']
POLL_S = 0.05


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = 'condition'
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not met within {timeout_s} s')
        await asyncio.sleep(POLL_S)
