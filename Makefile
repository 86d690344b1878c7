# Two commands for a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test lint bench clean

$(BIN)/audiobooks-scoring: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/audiobooks-scoring

demo: install
	$(BIN)/audiobooks-scoring demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

test: lint
	$(BIN)/python -m pytest -q -ra --durations=15

bench: install
	$(BIN)/audiobooks-scoring bench --customers 1000000

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache build dist
