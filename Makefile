# Everything builds .venv from scratch on a fresh machine: torch first (from the local
# wheel cache where there is one), then capray with its dev extra, every package pinned by
# constraints.txt (the same pins deploy/Dockerfile and CI install).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capray-installed

.PHONY: venv demo test bench clean

CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch torchvision
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/capray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/lambda_search.py

clean:
	rm -rf $(VENV) out .pytest_cache
