# The README's two commands are `make up` (run the pipeline) and `make test` (the tests).
# Every target sets itself up on a fresh machine: virtualenv, packages, Kafka jars.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
NAMESPACE ?= live
PYTEST_ARGS ?=

.PHONY: install broker registry up down test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0] + ": set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-* && touch $@

broker: install
	$(BIN)/pipeline broker start

registry: broker
	$(BIN)/pipeline registry start

# Until the supervisor lands, `make up` runs the broker and the schema registry, creates
# the namespace's topics and registers their schemas.
up: registry
	$(BIN)/pipeline topics --create --namespace $(NAMESPACE)
	$(BIN)/pipeline schemas register --namespace $(NAMESPACE)
	$(BIN)/pipeline topics --namespace $(NAMESPACE)

down: install
	$(BIN)/pipeline registry stop
	$(BIN)/pipeline broker stop

# The tests start their own broker on free ports (run/test) and stop it afterwards,
# also when tests fail; with KAFKA_BOOTSTRAP_SERVERS set they use that cluster instead.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks start their own broker and registry under run/bench; EVENTS sizes them.
EVENTS ?= 200000
bench: install
	$(BIN)/python -m bench --events $(EVENTS)

clean: down
	rm -rf run
