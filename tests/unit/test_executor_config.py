"""The executor's config schema: defaults, environment variables as sources, settings mapping."""

import pytest
from dagster._config import process_config

from dagster_taskiq.executor import DEFAULT_SLEEP_SECONDS, settings_from_config, taskiq_executor


def processed(config: dict[str, object]) -> dict[str, object]:
    result = process_config(taskiq_executor.config_schema.config_type, config)
    assert result.success, result.errors
    assert isinstance(result.value, dict)
    return result.value


def test_defaults_wait_for_events_and_check_health_often() -> None:
    config = processed({})
    assert config['sleep_seconds'] == DEFAULT_SLEEP_SECONDS == 1.0  # a fallback: events wake it
    assert config['check_step_health_interval_seconds'] == 5
    assert config['step_queued_timeout_seconds'] == 3600.0  # an hour, then fail with a reason


def test_environment_variables_are_config_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MY_QUEUE', 'steps-from-env')
    monkeypatch.setenv('MY_DB', 'postgresql://db.example/steps')
    config = processed(
        {
            'queue_name': {'env': 'MY_QUEUE'},
            'database_url': {'env': 'MY_DB'},
            'aws_endpoint_url': 'http://127.0.0.1:4566',
            'aws_region': 'eu-west-1',
        }
    )
    settings = settings_from_config(config)
    assert settings.queue_name == 'steps-from-env'
    assert settings.database_url == 'postgresql://db.example/steps'
    assert settings.aws_endpoint_url == 'http://127.0.0.1:4566'
    assert settings.aws_region == 'eu-west-1'


def test_unset_keys_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('DAGSTER_TASKIQ_QUEUE_NAME', 'from-settings')
    assert settings_from_config(processed({})).queue_name == 'from-settings'


def test_bad_config_is_refused() -> None:
    result = process_config(taskiq_executor.config_schema.config_type, {'sleep_seconds': 'fast'})
    assert not result.success


def test_the_public_api_is_at_the_package_root() -> None:
    import dagster_taskiq
    from dagster_taskiq.step_process import record_effect

    assert dagster_taskiq.taskiq_executor is taskiq_executor
    assert dagster_taskiq.record_effect is record_effect
    assert sorted(dagster_taskiq.__all__) == ['record_effect', 'taskiq_executor']
