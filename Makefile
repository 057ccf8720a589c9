# vigil — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit bench clean

$(STAMP): pyproject.toml
	@sh scripts/ensure-python.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/vigil demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench lab
	$(BIN)/ruff format --check src tests bench lab
	$(BIN)/mypy

test: lint
	@sh scripts/ensure-system.sh
	$(BIN)/pytest -q

bench: $(STAMP)
	@sh scripts/ensure-system.sh
	@sh scripts/ensure-bench.sh
	$(BIN)/python bench/restart_latency.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/keepalived_compare.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
