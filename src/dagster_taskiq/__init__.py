"""dagster-taskiq: run Dagster steps on async SQS workers with exactly-once completion."""
