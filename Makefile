# One entry point for people and CI. `make serve` and `make test` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp names the exact dependency set, so `make setup` reinstalls only when it changed.
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint typecheck pytest bench lock clean

setup: $(STAMP)

# requirements.lock pins the whole tree and is installed with --no-deps: no resolver run, no
# surprise upgrades, and nothing pulls torchvision (which breaks beside the CPU torch build).
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.setup-*
	touch $@

serve: setup
	$(VENV)/bin/boomerang serve --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check boomerang_core server tests bench
	$(VENV)/bin/ruff format --check boomerang_core server tests bench

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q -rs --durations=15

test: lint typecheck pytest

bench: setup
	$(PY) bench/serve_bench.py
	$(PY) bench/demo_curve.py

# Regenerate requirements.lock after changing a pin in pyproject.toml (run in a fresh venv).
lock:
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
