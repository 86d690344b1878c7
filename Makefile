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

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15

bench: install
	$(BIN)/audiobooks-scoring bench --customers 1000000

clean:
	rm -rf $(VENV) data .pytest_cache
