# The two commands a newcomer needs: `make run` and `make test`.  `make ui` serves the Dagster web UI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export REVERSE_SD_HOME ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
override DAGSTER_HOME := $(abspath $(DAGSTER_HOME))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test test-extended test-cluster ui install bench clean automation-start automation-stop automation-status

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone: pip takes it from the machine's local wheel store.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,deploy]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/reverse-sd materialize

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# What the default run leaves out: tests/e2e (whole-graph runs, the browser) and the multi-process tests
# (kill -9 recovery, torchrun, Postgres), and tests/bench: every bench script on tiny sizes.
test-extended: install
	$(BIN)/python -m pytest -q -m extended

# The Celery deployment (deploy/celery/) on loopback: Postgres, Redis, moto's S3 server, a code server, the
# webserver, the daemon and two Celery workers in network namespaces; the whole graph into the bucket, one worker
# killed with kill -9 mid-run, then --stale.  Installs Debian's postgresql and redis-server when missing (root).
test-cluster: install
	$(BIN)/python -m pytest -q -s -m cluster tests/cluster

# `dagster dev` runs from DAGSTER_HOME (so it does not warn about the project's own dagster.yaml, which was
# copied there); relative paths in the settings are made absolute first, so they mean what they meant here.
# Its one SupersessionWarning ("use 'dg dev'": the dg CLI is a separate package) is not shown.  DAGSTER_DISABLE_TELEMETRY:
# dagster.yaml's `telemetry: enabled: false` does not stop the webserver's and daemon's thread that uploads
# DAGSTER_HOME/logs to Dagster's telemetry server (cli/dagster_server.py says more); this does.
ui: install $(DAGSTER_HOME)/dagster.yaml
	# The "gpu" pool's default limit is written before the first run is queued, and runs left running by a
	# power loss are named (cli/runs.py says why).
	$(BIN)/python -c 'import dagster as dg; from cli.runs import apply_default_pool_limits as a, warn_of_lost_runs as w; i = dg.DagsterInstance.get(); a(i); w(i)'
	cd $(DAGSTER_HOME) && \
	  REVERSE_SD_HOME='$(if $(findstring ://,$(REVERSE_SD_HOME)),$(REVERSE_SD_HOME),$(abspath $(REVERSE_SD_HOME)))' \
	  $(if $(wildcard $(REVERSE_SD_DIFFUSIONDB)),REVERSE_SD_DIFFUSIONDB='$(abspath $(REVERSE_SD_DIFFUSIONDB))') \
	  PYTHONWARNINGS='ignore:Function `dev_command` is superseded' \
	  DAGSTER_DISABLE_TELEMETRY=1 \
	  $(CURDIR)/$(BIN)/dagster dev -w $(CURDIR)/workspace.yaml -h $${HOST:-127.0.0.1} -p $${PORT:-3000}

# The four automations (a schedule, three sensors; STOPPED on a fresh instance): start, stop or list them in this project's instance
# (DAGSTER_HOME is set above, which a bare `dagster schedule start` in a fresh shell lacks).  `make ui` runs
# the daemon that executes them.
AUTOMATIONS_SCHEDULES := observe_diffusiondb
AUTOMATIONS_SENSORS := diffusiondb_new_parts reverse_sd_automation damaged_artifacts

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	test -e $@ || cp dagster.yaml $@

automation-start: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster schedule start -w workspace.yaml $(AUTOMATIONS_SCHEDULES)
	for s in $(AUTOMATIONS_SENSORS); do $(BIN)/dagster sensor start -w workspace.yaml $$s || exit 1; done

automation-stop: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster schedule stop -w workspace.yaml $(AUTOMATIONS_SCHEDULES)
	for s in $(AUTOMATIONS_SENSORS); do $(BIN)/dagster sensor stop -w workspace.yaml $$s || exit 1; done

automation-status: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster schedule list -w workspace.yaml
	$(BIN)/dagster sensor list -w workspace.yaml

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf data .dagster_home/storage .dagster_home/history .dagster_home/schedules .dagster_home/logs
