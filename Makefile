# One obvious way to run each thing. `make demo` and `make test` create the virtual
# environment on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: venv demo test test-fast bench warmup summary clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The default federation, 2 rounds, with length-bucketed training batches: under 2 minutes
# on an idle 2-core CPU (the config's 3 rounds with random batches take about 3).
demo: $(STAMP)
	$(BIN)/lada run configs/default.toml --set rounds=2 --set train.length_buckets=true --run-dir runs/demo --overwrite

# Tests run on one worker per logical CPU, at most 4 (pytest-xdist): the Flower end-to-end runs
# spend much of their time waiting on process start-ups and polls, which another test's
# work fills. Each test process computes on one thread (tests/conftest.py).
TEST_WORKERS ?= -n logical --maxprocesses 4 --dist worksteal

test: $(STAMP)
	$(BIN)/pytest -q $(TEST_WORKERS)

test-fast: $(STAMP)
	$(BIN)/pytest -q $(TEST_WORKERS) -m "not e2e"

bench: $(STAMP)
	$(BIN)/python -m lada.experiments.bench --out bench/results.json

# The cross-scenario table (results/summary.md and the README's block) from finished runs.
summary: $(STAMP)
	$(BIN)/lada summary results/summary.toml --readme README.md --include docs/experiments.md

warmup: $(STAMP)
	$(BIN)/lada warmup configs/default.toml --ship

clean:
	rm -rf runs .pytest_cache
