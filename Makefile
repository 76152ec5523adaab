# taskrail: `make demo` runs the demo on the embedded default; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/taskrail demo

# Unit, integration and chaos tests, in two processes (a file's tests together). Needs
# PostgreSQL on 127.0.0.1 and redis-server on the PATH (the suite starts its own).
test: install
	$(BIN)/pytest -n 2 --dist loadfile

# Only the SQLite unit tests (no servers).
test-fast: install
	$(BIN)/pytest -m "not integration and not chaos"

lint: install
	$(BIN)/ruff check orchestration workers demo_agents tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	bench/run

clean:
	rm -rf $(VENV) .taskrail build *.egg-info
