# The README's commands. Each one sets up .venv itself on first use (idempotent on re-run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test recipe lab bench clean-nbs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps fairscale==0.4.13   # Meta reference (tests/test_vision.py)
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	@PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/test.sh

recipe: $(STAMP)
	$(PY) scripts/recipe.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab nbs

bench: $(STAMP)
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_decoder.py

clean-nbs: $(STAMP)
	$(VENV)/bin/nbdev-clean && $(VENV)/bin/nbdev-export
