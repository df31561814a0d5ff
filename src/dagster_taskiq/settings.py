"""Settings from the environment (prefix DAGSTER_TASKIQ_); standard AWS variables are honoured."""

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_QUEUE_NAME = 'dagster-taskiq-steps'
DEFAULT_ECS_CLUSTER = 'dagster-taskiq-local'
DEFAULT_WORKER_SERVICE = 'taskiq-worker'
DEFAULT_REGION = 'us-east-1'
DEFAULT_DATABASE_URL = 'postgresql://postgres@127.0.0.1:5432/postgres'
DEFAULT_VISIBILITY_TIMEOUT_S = 60
DEFAULT_MAX_RECEIVE_COUNT = 10
DEFAULT_LEASE_S = 30.0
DEFAULT_RETRY_BASE_S = 1.0
DEFAULT_RETRY_MAX_S = 16.0
DEFAULT_RETRY_ATTEMPTS = 6  # one call and 5 retries, waits capped at 1, 2, 4, 8, 16 s
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN_S = 30.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix='DAGSTER_TASKIQ_', extra='ignore', populate_by_name=True
    )

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices('DAGSTER_TASKIQ_DATABASE_URL', 'DATABASE_URL'),
    )
    aws_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            'DAGSTER_TASKIQ_AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_SQS', 'AWS_ENDPOINT_URL'
        ),
    )
    aws_region: str = Field(
        DEFAULT_REGION,
        validation_alias=AliasChoices(
            'DAGSTER_TASKIQ_AWS_REGION', 'AWS_REGION', 'AWS_DEFAULT_REGION'
        ),
    )
    queue_name: str = DEFAULT_QUEUE_NAME
    queue_url: str | None = None
    ecs_cluster: str = DEFAULT_ECS_CLUSTER
    worker_service: str = DEFAULT_WORKER_SERVICE
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT
    lease_s: float = DEFAULT_LEASE_S
    signing_key: SecretStr | None = None
    retry_base_s: float = DEFAULT_RETRY_BASE_S
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD
    breaker_cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S

    @property
    def dlq_name(self) -> str:
        return f'{self.queue_name}-dlq'

    @property
    def signing_key_bytes(self) -> bytes | None:
        return self.signing_key.get_secret_value().encode() if self.signing_key else None
