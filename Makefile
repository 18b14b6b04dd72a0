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
# cluster=auto | ray://HOST:PORT | HOST:PORT | local:N: candidate evaluations and artifact builds on Ray (docs/cluster.md)
cluster ?=
CLUSTER_ARG := $(if $(cluster),--cluster $(cluster),)

.DEFAULT_GOAL := compile
.PHONY: compile bench test clean venv help bench-prune bench-quant bench-frontier bench-coverage bench-realworld bench-realworld-traits artifacts rules

help:
	@echo "make                    compile model=$(model) target=$(target) recipe=$(recipe)"
	@echo "make compile model=M target=T recipe=R [ARGS='--set prune.target_macs=0.7']"
	@echo "make target=jetson      deploy bundle in out/<model>-jetson-<recipe>/ (docs/jetson.md)"
	@echo "make rules onnx=M.onnx  TensorRT explicit-quantization rule check of an ONNX file"
	@echo "make bench              latency/memory/fidelity of the compiled model vs its FP32 baseline"
	@echo "make test               the test suite (creates .venv on first use)"
	@echo "make bench-prune        criteria x allocation x recovery vs Torch-Pruning (EfficientNet-Lite0)"
	@echo "make bench-quant        FP32 vs ORT quantize_static vs edgec mixed-bit, one interleaved run"
	@echo "make bench-frontier     eval agreement vs speedup: prune 1.0-0.7 x {lstsq, distill} x {fp32, int8} + ORT (plot)"
	@echo "make bench-coverage     shipped prune recipe on 17 torchvision models at 0.7x MACs [ARGS='--criterion l1']"
	@echo "make bench-compile-time seconds per pass: ResNet-50 prune 0.5, EfficientNet-Lite0 default"
	@echo "make bench-realworld    cleanup/quant/default on real exports (torch.onnx TorchScript+dynamo, timm, onnxslim, ORT-quantized)"
	@echo "make bench-realworld-traits  default recipe on the hand-written trait models (Paddle, YOLO-style, ext. data, attention)"
	@echo "make artifacts          CI artifact builds: models x targets from artifacts.yaml, reproducible tarballs"
	@echo "make ... cluster=SPEC   run on Ray: auto | ray://HOST:PORT | HOST:PORT | local:N (docs/cluster.md)"
	@echo "make bench-cluster      serial vs --cluster local:2: prune scan (EfficientNet-Lite0) and coverage, same bytes"
	@echo "make clean              remove out/ and caches"

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,dev]'
	@# cuda-python 12 (JetPack 6's CUDA) beside torch's 13, for the bundle's CUDA-call checks (tests/test_trt_fake.py)
	$(PY) -m pip install -q --target $(VENV)/cuda12 'cuda-python>=12,<13'
	@touch $@

compile: $(STAMP)
	$(PY) -m pipeline compile --model $(model) --target $(target) --recipe $(recipe) --threads $(threads) --seed $(seed) $(CLUSTER_ARG) $(ARGS)

bench: $(STAMP)
	$(PY) -m pipeline bench --model $(model) --target $(target) --recipe $(recipe) --threads $(threads) --seed $(seed) $(CLUSTER_ARG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-prune: $(STAMP)
	$(PY) -m pip install -q 'torch-pruning==1.6.1'
	$(PY) bench/bench_prune.py $(ARGS)

bench-quant: $(STAMP)
	$(PY) bench/bench_quant.py $(ARGS)

bench-frontier: $(STAMP)
	$(PY) bench/bench_frontier.py $(ARGS)

bench-coverage: $(STAMP)
	$(PY) bench/coverage.py $(ARGS)

.PHONY: bench-compile-time
bench-compile-time: $(STAMP)
	$(PY) bench/bench_compile_time.py $(ARGS)

bench-realworld: $(STAMP)
	$(PY) -m pip install -q 'timm>=1.0'
	$(PY) bench/bench_realworld.py --corpus real $(ARGS)

bench-realworld-traits: $(STAMP)
	$(PY) bench/bench_realworld.py $(ARGS)

artifacts: $(STAMP)
	$(PY) -m edgec.pipeline.artifacts artifacts.yaml $(CLUSTER_ARG) $(ARGS)

.PHONY: bench-cluster
bench-cluster: $(STAMP)
	$(PY) bench/bench_cluster.py --cluster $(or $(cluster),local:2) $(ARGS)

rules: $(STAMP)
	$(PY) -m targets.tensorrt.rules $(onnx)

clean:
	rm -rf out .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
