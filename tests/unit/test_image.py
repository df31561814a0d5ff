"""The image, without Docker: the Dockerfile keeps its rules (hadolint lints the rest, `make
lint`), and the entry point runs each role's command (run here with stand-ins on its PATH)."""

import os
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).parents[2]
DOCKERFILE = (REPOSITORY / 'Dockerfile').read_text()
ENTRYPOINT = REPOSITORY / 'docker' / 'entrypoint.sh'
COMMANDS = ('dagster-webserver', 'dagster-daemon', 'dagster-taskiq')


def stages() -> list[list[str]]:
    """Each stage's instructions (continuation lines joined), comments dropped."""
    text = DOCKERFILE.replace('\\\n', ' ')
    found: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if line.startswith('FROM '):
            found.append([])
        if found:
            found[-1].append(line)
    return found


def test_the_image_is_multi_stage_on_slim_python_313_with_locked_dependencies() -> None:
    build, final = stages()
    assert 'ARG PYTHON_IMAGE=python:3.13-slim' in DOCKERFILE
    assert build[0] == 'FROM ${PYTHON_IMAGE} AS build' and final[0] == 'FROM ${PYTHON_IMAGE}'
    assert any('uv pip sync --require-hashes requirements.runtime.lock' in i for i in build)
    assert any(i.startswith('COPY --from=build /opt/venv') for i in final)


def test_the_final_stage_has_no_build_tools_and_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    text = '\n'.join(final)
    for tool in ('apt-get', 'pip install', 'uv ', 'gcc', 'build-essential'):
        assert tool not in text, tool
    [user] = [i for i in final if i.startswith('USER ')]
    assert user.split()[1].split(':')[0] not in {'0', 'root'}
    assert 'ENTRYPOINT ["entrypoint"]' in final


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """Executables named like each role's command that print what they were given."""
    for name in COMMANDS:
        script = tmp_path / name
        script.write_text(f'#!/bin/sh\necho "{name} $*"\necho "url=${{DAGSTER_POSTGRES_URL:-}}"\n')
        script.chmod(0o755)
    return tmp_path


def entrypoint(stand_ins: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ['sh', str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            'PATH': f'{stand_ins}:/usr/bin:/bin',
            'DATABASE_URL': 'postgresql://dagster:secret@db.internal:5432/dagster',
        },
    )


@pytest.mark.parametrize(
    ('role', 'expected'),
    [
        (
            'webserver',
            'dagster-webserver --host 0.0.0.0 --port 3000 -w /opt/dagster/workspace.yaml',
        ),
        ('daemon', 'dagster-daemon run -w /opt/dagster/workspace.yaml'),
        ('worker', 'dagster-taskiq worker --concurrency 8'),
        ('autoscaler', 'dagster-taskiq autoscaler --max-workers 8'),
    ],
)
def test_each_role_runs_its_command_with_dagsters_storage_url(
    stand_ins: Path, role: str, expected: str
) -> None:
    options = {'worker': ['--concurrency', '8'], 'autoscaler': ['--max-workers', '8']}
    done = entrypoint(stand_ins, role, *options.get(role, []))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert expected in lines
    assert 'url=postgresql+psycopg2://dagster:secret@db.internal:5432/dagster' in lines
    if role == 'daemon':  # the store's migrations first
        assert lines[0] == 'dagster-taskiq db upgrade'


def test_an_unknown_role_is_refused_saying_which(stand_ins: Path) -> None:
    done = entrypoint(stand_ins, 'scheduler')
    assert done.returncode == 64
    assert "usage: entrypoint webserver|daemon|worker|autoscaler [options] (got 'scheduler')" in (
        done.stderr
    )
    assert os.access(ENTRYPOINT, os.X_OK)
