# One-command set-up on a fresh machine: `make demo` (main job) and `make test` (test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take torch's CPU build from the local wheel cache; GPU clusters keep their own.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-integration test-cluster lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,eval]'
	$(PY) -m pretrain.lm_eval --install-plugin
	touch $@

demo: install
	DS_ACCELERATOR=cpu $(PY) -m pretrain.demo

# every tier (what CI runs): tests/unit (in-process), tests/integration (gloo ranks, DeepSpeed),
# tests/cluster (the Slurm sandbox)
test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests

test-unit: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests/unit

test-integration: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests/integration

test-cluster: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests/cluster

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/attention_overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
