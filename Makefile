# The README's commands. Each one sets up .venv itself on first use (idempotent on re-run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test recipe lab bench clean-nbs pretrain-ddp pretrain-fsdp

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps torchao==0.18.0
	$(PY) -m pip install -q --no-deps executorch==1.5.1 flatbuffers ruamel.yaml tabulate   # .pte export + runtime
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
	$(PY) -m pip install -q --no-deps torchtune==0.6.1
	$(PY) -m pip install -q --no-deps fairscale==0.4.13   # Meta reference (tests/test_vision.py)
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	@PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/test.sh

recipe: $(STAMP)
	$(PY) scripts/recipe.py

# The tiny pretraining on 2 processes of this machine (gloo on CPU, nccl on GPUs): 40 steps, DDP or FSDP2.
# More steps: make pretrain-ddp STEPS=400; more processes: NPROC=4. Resumes from runs/pretrain-<mode>/checkpoint.
NPROC ?= 2
STEPS ?= 40
pretrain-ddp pretrain-fsdp: pretrain-%: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		scripts/pretrain.py --parallel $* --steps $(STEPS) --out runs/pretrain-$*

lab: $(STAMP)
	$(VENV)/bin/jupyter lab nbs

bench: $(STAMP)
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_decoder.py
	$(PY) bench/bench_posttrain.py
	$(PY) bench/bench_distill.py
	$(PY) bench/bench_adapter.py

clean-nbs: $(STAMP)
	$(VENV)/bin/nbdev-clean && $(VENV)/bin/nbdev-export
