# Everything builds .venv from scratch on a fresh machine: torch first (from the local
# wheel cache where there is one), then capray with its dev extra, every package pinned by
# constraints.txt (the same pins deploy/Dockerfile and CI install).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capray-installed

.PHONY: venv demo test test-all lint docs bench clean

CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch torchvision
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/capray demo

# Two tiers (markers in pyproject.toml): `make test` is the fast tier a developer runs after every change
# (everything not marked `slow`: ≤ 8 min on 2 cores); `make test-all` runs every tier, as CI does.
PYTEST := $(BIN)/python -m pytest -q --durations=15

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(PYTEST) tests

lint: $(STAMP)
	$(BIN)/python -m ruff check .

docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict -d site

bench: $(STAMP)
	$(BIN)/python benchmarks/lambda_search.py

clean:
	rm -rf $(VENV) out site .pytest_cache
