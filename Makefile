# tauon: the two front-door commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo demo-llm demo-s3 test lint unit workload cluster-tests e2e crds cluster-up cluster-down e2e-kind bench vllm-env contract

$(VENV_STAMP): pyproject.toml
	@command -v uv >/dev/null || python3 -m pip install -q uv==0.13.8
	@test -x .venv/bin/python || uv venv -q --python python3.11 .venv
	VIRTUAL_ENV=.venv uv pip install -q -e '.[trainer,local,dev]'
	@rm -f .venv/.installed-*; touch $@

install: $(VENV_STAMP)

crds: install
	.venv/bin/tauon crds

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	.venv/bin/tauon crds --check

unit: install
	.venv/bin/pytest -q tests/unit

workload: install
	.venv/bin/pytest -q tests/workload

cluster-tests: install
	.venv/bin/pytest -q tests/cluster

e2e: install
	.venv/bin/pytest -q tests/e2e

test: install lint
	.venv/bin/pytest -q tests

cluster-up: install
	$(PY) hack/cluster/cluster.py up --process-nodes $(or $(PROCESS_NODES),0)

cluster-down:
	python3 hack/cluster/cluster.py down

demo: install
	$(PY) hack/demo.py

demo-llm: install
	$(PY) hack/demo_llm.py

demo-s3: install
	$(PY) hack/demo_s3.py

bench: install
	$(PY) bench/trainer.py
	$(PY) bench/serving.py
	$(PY) bench/llm_serving.py
	$(PY) bench/memory.py
	$(PY) bench/data.py
	$(PY) bench/scale/run.py

e2e-kind:
	bash hack/e2e-kind.sh

# vLLM's own CLI parser and config checks run against the argv the operator renders (tests/contract).
# Not part of `make test`: the vLLM venv is ~9 GB (vllm pins its own torch), built once by `make vllm-env`.
VLLM_VERSION := 0.11.0
# vllm 0.11.0 asks for transformers>=4.55.2 and breaks on 5.x (its tokenizer wrapper); its image ships 4.x
VLLM_TRANSFORMERS := 4.57.1
TAUON_VLLM_CACHE ?= $(HOME)/.cache/tauon-vllm
export TAUON_VLLM_CACHE

vllm-env:
	@command -v uv >/dev/null || python3 -m pip install -q uv==0.13.8
	@test -x $(TAUON_VLLM_CACHE)/venv/bin/python || uv venv -q --python python3.11 $(TAUON_VLLM_CACHE)/venv
	VIRTUAL_ENV=$(TAUON_VLLM_CACHE)/venv uv pip install -q vllm==$(VLLM_VERSION) transformers==$(VLLM_TRANSFORMERS)

contract: install vllm-env
	TAUON_VLLM_CONTRACT=1 TAUON_CONTRACT_RESULTS=bench/results/vllm_contract.json .venv/bin/pytest -q -p no:cacheprovider tests/contract
