# The README's two commands: `make run` (the example service) and `make test` (the suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test test-rabbitmq4 test-unit test-fast test-docs lint typecheck bench docs broker browser \
	cluster-up cluster-down clean chaos ledger postgres

# What running the example needs: rabbitflow itself.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

# What the tests, the linters and the docs need.
$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[dev,docs,sql]'
	touch $(STAMP)

# tests/test_docs.py renders the site in headless Chromium (installed like the broker: as root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: no chromium; tests/test_docs.py will skip (and fail in CI): apt-get install chromium"

broker:
	scripts/broker.sh

run: $(RUN_STAMP) broker
	$(BIN)/rabbitflow run examples/orders.py:app

lint: $(STAMP)
	$(BIN)/ruff check rabbitflow tests examples benchmarks
	$(BIN)/ruff format --check rabbitflow tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

# Lint, types, then every test on RabbitMQ 3.10.8 and every broker test again on a real 4.0.5
# (scripts/suite.sh): the failover tests on a local 3-node cluster of each version, rabbitflow.sql
# on the project's own PostgreSQL; all started beside the default broker and stopped afterwards.
test: $(STAMP) browser broker lint typecheck
	scripts/suite.sh $(BIN)/python

# The broker tests on a real RabbitMQ 4.0.5 alone (phases 2 and 3 of scripts/suite.sh).
test-rabbitmq4: $(STAMP) broker
	RABBITFLOW_SUITE_PHASES=2,3 scripts/suite.sh $(BIN)/python

# The documentation's tests: the site builds, its examples run, the topology diagram draws in
# headless Chromium (this installs it when missing and you are root).
test-docs: $(STAMP) browser
	$(BIN)/python -m pytest tests/test_docs.py -q -p no:cacheprovider

# The tests that need no broker, alone, in seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit -q -p no:cacheprovider

# Everything but the cluster tests, for a quick loop while editing.
test-fast: $(STAMP) broker
	$(BIN)/python -m pytest -m "not cluster" -x -q

# The peers (FastStream) and matplotlib for the chart; the failover scenario starts the cluster.
bench: $(STAMP) broker
	$(BIN)/pip install -q -r benchmarks/requirements.txt
	test -f /usr/include/amqp.h || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq librabbitmq-dev >/dev/null; } \
	  || echo "note: no librabbitmq-dev; the C contender will be reported as failed: apt-get install librabbitmq-dev"
	$(BIN)/python benchmarks/run.py --out docs/benchmarks.md

# The site into site/ (offline: Mermaid is vendored in docs/assets/javascripts); the hook in
# docs/hooks/cli_reference.py rewrites docs/cli.md from the CLI's parser first.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The chaos soak (docs/reliability.md): faults on the 3-node cluster for CHAOS_MINUTES (10) and
# CHAOS_MESSAGES (200000); CHAOS_SEED repeats a run (random and printed otherwise). Starts the
# cluster when it does not run (and stops it after); fails when the ledger finds a lost or stuck message.
# RABBITFLOW_BROKER_VERSION=4.0 runs it on a 4.0.5 cluster (scripts/rabbitmq4.sh).
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.runner

# The effectively-once ledger (docs/reliability.md): exactly_once workers SIGKILLed between commit
# and ack and mid-relay for LEDGER_MINUTES (10) and LEDGER_INPUTS (20000); LEDGER_ARGS=--cluster
# runs it on the 3-node cluster (start it first: make cluster-up) with broker nodes killed too.
ledger: $(STAMP) broker
	scripts/postgres.sh start
	$(BIN)/python -m tests.sql.ledger --minutes $(or $(LEDGER_MINUTES),10) \
	  --inputs $(or $(LEDGER_INPUTS),20000) $(LEDGER_ARGS); s=$$?; scripts/postgres.sh stop; exit $$s

postgres:
	scripts/postgres.sh start

cluster-up:
	scripts/cluster.sh start

cluster-down:
	scripts/cluster.sh stop

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
