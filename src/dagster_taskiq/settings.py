"""Settings from the environment (prefix DAGSTER_TASKIQ_); standard AWS variables are honoured."""

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dagster_taskiq.defaults import (
    DEFAULT_ABANDON_GRACE_S,
    DEFAULT_BREAKER_COOLDOWN_S,
    DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_DATABASE_URL,
    DEFAULT_ECS_CLUSTER,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_QUEUE_NAME,
    DEFAULT_REGION,
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_BASE_S,
    DEFAULT_RETRY_MAX_S,
    DEFAULT_STORE_CALL_TIMEOUT_S,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    DEFAULT_WORKER_SERVICE,
)


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
    # ECS (the auto-scaler, the local ECS agent) where it is served apart from SQS (LocalStack's
    # free edition serves SQS but not ECS); unset: aws_endpoint_url
    ecs_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices('DAGSTER_TASKIQ_ECS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_ECS'),
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
    visibility_timeout_s: int = Field(DEFAULT_VISIBILITY_TIMEOUT_S, ge=0, le=43200)  # SQS's range
    max_receive_count: int = Field(DEFAULT_MAX_RECEIVE_COUNT, ge=1, le=1000)
    lease_s: float = Field(DEFAULT_LEASE_S, gt=0)
    abandon_grace_s: float = Field(DEFAULT_ABANDON_GRACE_S, ge=0)
    store_call_timeout_s: float = Field(DEFAULT_STORE_CALL_TIMEOUT_S, gt=0)
    signing_key: SecretStr | None = None
    retry_base_s: float = Field(DEFAULT_RETRY_BASE_S, gt=0)
    retry_max_s: float = Field(DEFAULT_RETRY_MAX_S, gt=0)
    retry_attempts: int = Field(DEFAULT_RETRY_ATTEMPTS, ge=1)
    breaker_threshold: int = Field(DEFAULT_BREAKER_THRESHOLD, ge=1)
    breaker_cooldown_s: float = Field(DEFAULT_BREAKER_COOLDOWN_S, ge=0)

    @field_validator('aws_endpoint_url', 'ecs_endpoint_url')
    @classmethod
    def _endpoint_has_a_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(('http://', 'https://')):
            raise ValueError(f'{url!r} needs a scheme, e.g. http://{url}')
        return url

    @property
    def ecs_endpoint(self) -> str | None:
        return self.ecs_endpoint_url or self.aws_endpoint_url

    @property
    def dlq_name(self) -> str:
        return f'{self.queue_name}-dlq'

    @property
    def signing_key_bytes(self) -> bytes | None:
        return self.signing_key.get_secret_value().encode() if self.signing_key else None
