# The README's two commands are `make up` (run the pipeline) and `make test` (the tests).
# Every target sets itself up on a fresh machine: virtualenv, packages, Kafka jars.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py pipeline/avro/_avro.c | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install browser broker broker-secure cluster registry up demo down status lint test test-unit chaos bench fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py pipeline/avro/_avro.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0] + ": set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-* && touch $@

# Debian's Chromium for the dashboard's and the report's browser tests (Playwright drives
# it; no browser download). Skipped when it is already there.
browser:
	@command -v chromium >/dev/null || { SUDO=$$(command -v sudo || true); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

broker: install
	$(BIN)/pipeline broker start

# The same broker secured: SASL_SSL/SCRAM, one principal per role, ACLs (pipeline/ops/broker_secure.py).
broker-secure: install
	$(BIN)/pipeline broker start --secure

# A 3-node KRaft cluster in the run directory (each node a broker and a controller voter);
# `make up`/`make demo` then run on it, every topic replicated 3 ways.
cluster: install
	$(BIN)/pipeline broker start --nodes 3

registry: broker
	$(BIN)/pipeline registry start

# `make up` runs topology.toml (Gemini's live market data) under the supervisor;
# `make demo` runs the same offline on the local venue replaying the real capture.
up: install
	$(BIN)/pipeline up

demo: install
	$(BIN)/pipeline up --topology topology.demo.toml

down: install
	$(BIN)/pipeline down

status: install
	$(BIN)/pipeline status

# ruff over everything (pyproject.toml [tool.ruff]), mypy strict over the pure packages
# (core, market, trading, strategies: [tool.mypy]); .ci/run runs it before make test.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The tests (all but the bench harness's, which make bench runs) start their own broker on free ports (run/test) and stop it afterwards,
# also when tests fail; with KAFKA_BOOTSTRAP_SERVERS set they use that cluster instead.
test: install browser
	$(BIN)/python -m pytest -m "not bench and not chaos" $(PYTEST_ARGS)

# tests/unit/ (mirroring pipeline/'s packages): no broker starts, and a test there that asks
# for Kafka is a collection error (tests/conftest.py). make test runs these too.
test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The slow fault runs: first the one-minute chaos test (tests/integration/test_cluster.py, marked
# chaos), then the demo topology on its own 3-node cluster for CHAOS_MINUTES under a
# seeded schedule of kill -9s and venue faults, then invariants over every record written.
CHAOS_MINUTES ?= 10
CHAOS_SEED ?= 1
chaos: install
	$(BIN)/python -m pytest -m chaos -q -p no:randomly
	$(BIN)/pipeline chaos --minutes $(CHAOS_MINUTES) --seed $(CHAOS_SEED) --nodes 3

# Benchmarks start their own broker and registry under run/bench; EVENTS sizes them.
EVENTS ?= 200000
# First the harness at a tiny size (tests/integration/test_bench.py, marked bench: make test leaves it to
# this target), then the real run.
bench: install
	$(BIN)/python -m pytest -m bench -q -p no:randomly
	$(BIN)/python -m bench --events $(EVENTS)

# The C Avro codec (pipeline/avro/_avro.c) built with AddressSanitizer and UBSan into build/asan/
# (the normal extension is untouched), fed FUZZ_RECORDS mutated records per schema (and a
# quarter as many mutated values to encode); 53 minutes measured on the shared 2-core
# machine under load. FUZZ_SEED reruns
# a run (each run prints its seed and the command repeating it).
FUZZ_RECORDS ?= 1000000
FUZZ_SEED ?=
fuzz: install
	$(BIN)/python -m fuzz.avro_asan --asan --records $(FUZZ_RECORDS) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

clean: down
	rm -rf run
