# edgec: `make` compiles the default model for the CPU target; `make test` runs the test suite.
# Both create .venv and install into it on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgec-installed

model ?= efficientnet_lite0
target ?= ort
recipe ?= default
threads ?= 1,2
seed ?= 0
ARGS ?=

.DEFAULT_GOAL := compile
.PHONY: compile bench test test-fast clean venv help bench-prune bench-quant bench-coverage artifacts

help:
	@echo "make                    compile model=$(model) target=$(target) recipe=$(recipe)"
	@echo "make compile model=M target=T recipe=R [ARGS='--set prune.target_macs=0.7']"
	@echo "make bench              latency/memory/fidelity of the compiled model vs its FP32 baseline"
	@echo "make test               the test suite (creates .venv on first use)"
	@echo "make clean              remove out/ and caches"

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

compile: $(STAMP)
	$(PY) -m pipeline compile --model $(model) --target $(target) --recipe $(recipe) --threads $(threads) --seed $(seed) $(ARGS)

bench: $(STAMP)
	$(PY) -m pipeline bench --model $(model) --target $(target) --recipe $(recipe) --threads $(threads) --seed $(seed) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf out .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
