# What a newcomer types: `make demo` (the stack up, every demo job once, down), `make up` (the stack
# stays up: UI on http://127.0.0.1:3000) and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
export UV_PYTHON := $(BIN)/python

.PHONY: install test test-py313 lint demo up localstack lock clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	test -x $(BIN)/python || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet requirements.lock
	$(UV) pip install --quiet --no-deps --editable .
	touch $@

lint: install
	$(BIN)/ruff check src tests bench deploy
	$(BIN)/ruff format --check src tests bench deploy
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck docker/entrypoint.sh scripts/*.sh .ci/run

# Two test files at a time (each file on one process: a module's stack is started once)
test: lint
	$(BIN)/pytest -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

# The unit tests and the store's and step processes' integration tests on Python 3.13 (the image's;
# pyenv's where present); the rest of the integration tests run on 3.11 only (CI's 25 min budget)
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
PY313_TESTS = tests/unit tests/integration/test_store.py tests/integration/test_step_runner.py \
	tests/integration/test_run_events.py
test-py313: .venv313/.installed
	.venv313/bin/pytest -n 2 --dist loadfile $(PY313_TESTS) $(PYTEST_ARGS)

.venv313/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	test -x .venv313/bin/python || $(PYTHON) -m uv venv --quiet --python $(PY313) .venv313
	UV_PYTHON=.venv313/bin/python $(PYTHON) -m uv pip sync --quiet requirements.lock
	UV_PYTHON=.venv313/bin/python $(PYTHON) -m uv pip install --quiet --no-deps --editable .
	touch $@

demo: install
	$(BIN)/dagster-taskiq-demo demo

up: install
	$(BIN)/dagster-taskiq-demo up

# LocalStack in host mode, for `up --emulator localstack`: Python 3.13 (pyenv's where present) and
# its dependencies as of its release (later cbor2 and pyopenssl releases break its start).
LOCALSTACK_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
localstack: .localstack/bin/python

.localstack/bin/python:
	$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --python $(LOCALSTACK_PYTHON) .localstack
	$(UV) pip install --quiet --python .localstack/bin/python --exclude-newer 2026-03-24 \
		'localstack-core[base-runtime]==2026.3.0' moto-ext

# Re-resolve after editing dependencies; commit requirements.lock (uv.lock names index hosts: not committed).
# requirements.lock: everything (make install); requirements.runtime.lock: what the image installs
lock:
	$(UV) lock
	$(UV) export --quiet --format requirements-txt --no-emit-project --all-groups -o requirements.lock
	$(UV) export --quiet --format requirements-txt --no-emit-project --no-dev -o requirements.runtime.lock

clean:
	rm -rf $(VENV) .venv313
