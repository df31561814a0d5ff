# What a newcomer types: `make demo` (the stack up, every demo job once, down), `make up` (the stack
# stays up: UI on http://127.0.0.1:3000) and `make test`. Each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
export UV_PYTHON := $(BIN)/python

.PHONY: install test lint demo up lock clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	test -x $(BIN)/python || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet requirements.lock
	$(UV) pip install --quiet --no-deps --editable .
	touch $@

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/dagster-taskiq-demo demo

up: install
	$(BIN)/dagster-taskiq-demo up

# Re-resolve after editing dependencies; commit requirements.lock (uv.lock names index hosts: not committed).
lock:
	$(UV) lock
	$(UV) export --quiet --format requirements-txt --no-emit-project --all-groups -o requirements.lock

clean:
	rm -rf $(VENV)
