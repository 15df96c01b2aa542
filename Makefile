# Offline defaults for this checkout; override on the command line (make test SHARED=/data/shared).
SHARED ?= ../shared
OFFLINE = HF_HOME=$(SHARED)/hf HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=$(SHARED)/data

.PHONY: help install test test-fast lint format smoke train train-lm prune bench bench-gpu clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "%-10s %s\n", $$1, $$2}'

install:  ## editable install with dev tools
	pip install -e ".[dev,gguf,harness,peers]"

test:  ## the full suite, as CI runs it
	$(OFFLINE) python -m pytest

FAST = not slow and not slurm and not sweep and not concurrency and not distributed

test-fast:  ## the fast tier: no slow, slurm, sweep, concurrency or distributed tests (under 5 min on 2 cores)
	$(OFFLINE) python -m pytest -m "$(FAST)"

lint:  ## ruff checks
	ruff check . && ruff format --check .

format:  ## ruff fix + format
	ruff check --fix . && ruff format .

smoke:  ## the whole pipeline on a slice, in under 3 minutes
	$(OFFLINE) python -m distill.train experiment=bert_to_tiny debug=smoke

train:  ## the full bert_to_tiny experiment
	$(OFFLINE) python -m distill.train experiment=bert_to_tiny

LM_TEACHER = DISTILL_LM_TEACHER=$(SHARED)/models/SmolLM2-135M-Instruct-Q4_1/SmolLM2-135M-Instruct.Q4_1.gguf

train-lm:  ## SmolLM2-135M pruned to 15 layers and distilled back (experiment=smollm2_to_small)
	$(OFFLINE) $(LM_TEACHER) python -m distill.train experiment=smollm2_to_small

prune:  ## one-shot SparseGPT 2:4 of SmolLM2-135M (python -m distill.prune)
	$(OFFLINE) $(LM_TEACHER) python -m distill.prune method=sparsegpt pattern=2:4

bench:  ## CPU benchmarks (markdown tables; JSON under bench/results/)
	$(OFFLINE) python bench/group_by_length.py
	python bench/compression_overhead.py
	$(OFFLINE) python bench/teacher_cache.py
	python bench/kd_loss.py
	python bench/kd_loss.py --inputs hidden --vocab 32768
	python bench/framework_overhead.py
	$(OFFLINE) python bench/int8_runtimes.py

bench-gpu:  ## GPU benchmarks (CUDA; sm80+ for 2:4): KD loss at vocab 128k, its launch settings, 2:4 Linear layers
	python bench/kd_loss.py --device cuda --dtype bfloat16 --vocab 131072 --positions 8192
	python bench/kd_loss.py --device cuda --dtype bfloat16 --vocab 131072 --positions 8192 --inputs hidden --hidden 4096
	python bench/kd_triton_configs.py
	python bench/sparse24.py --tokens 2048 16384 --algs 5

clean:  ## remove run folders and caches of this checkout
	rm -rf logs .pytest_cache .ruff_cache
