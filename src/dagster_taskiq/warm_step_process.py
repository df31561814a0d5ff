"""Imported by the worker's forkserver only: step processes forked from it share a warm instance."""

from dagster_taskiq import step_process

step_process.warm_up()
