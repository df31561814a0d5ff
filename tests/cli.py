"""Helpers shared by integration tests."""

from dagster_taskiq.settings import Settings
from dagster_taskiq.sqs import CircuitBreaker, bootstrap, sqs_client


async def bootstrapped(settings: Settings) -> None:
    """Create the settings' queue pair on the emulator."""
    async with sqs_client(settings) as client:
        await bootstrap(client, settings, CircuitBreaker(5, 30))
