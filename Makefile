# Offline defaults for this checkout; override on the command line (make test SHARED=/data/shared).
SHARED ?= ../shared
OFFLINE = HF_HOME=$(SHARED)/hf HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=$(SHARED)/data

.PHONY: help install test test-fast lint format smoke train bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "%-10s %s\n", $$1, $$2}'

install:  ## editable install with dev tools
	pip install -e ".[dev]"

test:  ## the full suite, as CI runs it
	$(OFFLINE) python -m pytest

test-fast:  ## skip the slow end-to-end runs
	$(OFFLINE) python -m pytest -m "not slow"

lint:  ## ruff checks
	ruff check . && ruff format --check .

format:  ## ruff fix + format
	ruff check --fix . && ruff format .

smoke:  ## the whole pipeline on a slice, in under 3 minutes
	$(OFFLINE) python -m distill.train experiment=bert_to_tiny debug=smoke

train:  ## the full bert_to_tiny experiment
	$(OFFLINE) python -m distill.train experiment=bert_to_tiny

bench:  ## CPU benchmarks (markdown tables; JSON under bench/results/); GPU: bench/sparse24.py, bench/kd_loss.py --device cuda [--inputs hidden]
	$(OFFLINE) python bench/group_by_length.py
	python bench/compression_overhead.py
	$(OFFLINE) python bench/teacher_cache.py
	python bench/kd_loss.py
	python bench/kd_loss.py --inputs hidden --vocab 32768
	python bench/framework_overhead.py

clean:  ## remove run folders and caches of this checkout
	rm -rf logs .pytest_cache .ruff_cache
