# Two commands are all a fresh Debian/Ubuntu machine needs: `make run` and `make test`.
# Both install what is missing first (virtualenv, Python packages, HAProxy, and Redis/RabbitMQ
# servers when none is listening).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?=
# More options for `make run`, e.g. RUN_ARGS='--port 2023 --nodes 3' or '--auto-ports' (python -m local_cluster -h)
RUN_ARGS ?=

.PHONY: run test doctor drill chaos bench setup system-deps browser-deps lint typecheck unit integration e2e engines-test clean

# Supervises every process (a dead one is restarted with backoff); Ctrl-C or SIGTERM stops them all.
run: setup
	$(PY) -m local_cluster $(if $(CONFIG),--config $(CONFIG),) $(RUN_ARGS)

test: setup lint typecheck
	$(PY) -m pytest -q

# Checks a deployment's settings against the real PBX, broker, Redis, HAProxy, certificate; DOCTOR_ARGS for more.
doctor: setup
	$(PY) -m doctor $(if $(CONFIG),--config $(CONFIG),) $(DOCTOR_ARGS)

# Failover drill: 200 simulated Creatio agents, a node SIGKILLed under traffic; DRILL_ARGS for more.
drill: setup
	$(PY) -m ops.drill --agents 200 $(DRILL_ARGS)

# Every fault in turn (node kill/stop, gateway, RabbitMQ, Redis, AMI, Asterisk restart, slow links)
# under traffic with 300 agents on both transports; prints a PASS/FAIL per fault. CHAOS_ARGS for more.
chaos: setup
	$(PY) -m ops.chaos $(CHAOS_ARGS)

# Benchmarks of every stage against same-run baselines; BENCH_ARGS=--quick for a smoke run.
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

setup: system-deps browser-deps $(STAMP)

system-deps:
	@bash scripts/setup-system.sh
	@bash scripts/setup-ops.sh

browser-deps:
	@bash scripts/setup-browser.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

e2e: setup
	$(PY) -m pytest -q tests/e2e

# The clustered-engines failover test alone (3 RabbitMQ members, Redis with Sentinel), as `make test` runs it.
engines-test: setup
	$(PY) -m pytest -q -s -p no:hypothesispytest tests/integration/test_clustered_engines.py

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
