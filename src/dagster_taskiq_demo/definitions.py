"""Demo jobs. (The executor issue wires them to `taskiq_executor` and adds the rest.)"""

from dagster import Definitions, job, op


@op
def say_hello() -> str:
    return 'hello'


@job
def hello_job() -> None:
    say_hello()


defs = Definitions(jobs=[hello_job])
