# vlmpool — the commands a developer and CI run. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= test,hf,s3
PYTEST_ARGS ?=

.PHONY: epp
epp:  ## the Gateway API Inference Extension's endpoint picker + InferencePool CRD (release pinned in operator/vlmpool/pins.py; cached)
	@bash hack/epp.sh

.PHONY: help install k8s-bins crds crds-check lint test test-vllm test-unit test-apiserver bench clean

help:
	@echo "make dev         the whole system on the real node with a quickstart pool (DEV_ARGS=\"--gpus 2\", \"--engine vllm\": real vLLM; make node-down removes it)"
	@echo "make dev-process the same on the process kubelet (no images, no containerd; Ctrl-C stops)"
	@echo "make prereqs     build the Kubernetes binaries, the vLLM env and the node's images at once (cold CI)"
	@echo "make install     create $(VENV) and install vlmpool with the [$(EXTRAS)] extras"
	@echo "make epp         find or build the GIE endpoint picker (EPP) and InferencePool CRD for tests/routing (cached)"
	@echo "make k8s-bins    find or build etcd, kube-apiserver, kube-controller-manager, kubectl, helm, kubelet, kube-proxy, kube-scheduler (cached)"
	@echo "make crds        regenerate crds/*.yaml from the pydantic models"
	@echo "make lint        ruff and mypy with the rules in pyproject.toml (part of make test)"
	@echo "make test        install, lint, obtain the binaries, and run every test"
	@echo "make test-vllm   the pinned vLLM's own LoRA loader judges the patcher and the simulator (cached venv, several GB)"
	@echo "make images      build the container images (needs a Docker engine; IMAGES=vllm-cpu: the real engine)"
	@echo "make kind-e2e    the e2e suite on a kind cluster (needs Docker and kind)"
	@echo "make node        a real single-node cluster here (root; apt, dockerd, containerd, kubelet; the chart)"
	@echo "make test-node   the e2e suite on that node (NODE_ENGINE=vllm: real vLLM too, as CI; make node-down removes it)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

k8s-bins:
	@bash hack/k8s-bins.sh

crds: install
	$(VENV)/bin/vlmpool crds

crds-check: install
	$(VENV)/bin/vlmpool crds --check

lint: install  ## ruff and mypy, configured (and their rule sets defended) in pyproject.toml
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/mypy

test: install lint k8s-bins epp
	VLMPOOL_K8S_BIN="$$(bash hack/k8s-bins.sh | tail -n1)" VLMPOOL_EPP_DIR="$$(bash hack/epp.sh | tail -n1)" \
	  $(PY) -m pytest $(PYTEST_ARGS)

test-vllm: install  ## vLLM's own LoRA loader (release pinned in operator/vlmpool/pins.py) in a venv cached under ~/.cache/vlmpool
	VLMPOOL_VLLM_PYTHON="$$(bash hack/vllm-env.sh | tail -n1)" $(PY) -m pytest tests/vllm $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/api tests/controller tests/kube tests/manifests tests/testing $(PYTEST_ARGS)

test-apiserver: install k8s-bins
	VLMPOOL_K8S_BIN="$$(bash hack/k8s-bins.sh | tail -n1)" $(PY) -m pytest tests/apiserver $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist operator/*.egg-info

.PHONY: dev dev-process prereqs
dev: install k8s-bins  ## the whole system on the real node (hack/node.sh dev): the chart's operator, a quickstart pool and adapter, the pool's Service forwarded here
	bash hack/node.sh dev $(DEV_ARGS)

dev-process: install k8s-bins  ## the same on the process kubelet (no images, no containerd): control plane, operator, quickstart pool
	VLMPOOL_K8S_BIN="$$(bash hack/k8s-bins.sh | tail -n1)" $(VENV)/bin/vlmpool dev $(DEV_ARGS)

prereqs:  ## the slow cold prerequisites at once: Kubernetes binaries (CPU), vLLM env (download), node images + containerd (network, disk)
	bash hack/prereqs.sh

.PHONY: images kind-e2e
images:  ## build the operator, proxy, patcher and simulator images (needs a Docker engine; fails saying so without one)
	bash images/build.sh $(IMAGES)

kind-e2e:  ## the e2e suite on a kind cluster: images built and loaded, chart installed, simulator as the engine
	bash hack/kind-e2e.sh

.PHONY: node node-down test-node
node: install k8s-bins  ## a real single-node cluster here (root): images built, containerd, kubelet, the chart installed (hack/node.sh)
	bash hack/node.sh up

node-down:  ## remove everything `make node` made (processes, mounts, network namespace, routes, rules, state)
	bash hack/node.sh down

test-node: node  ## the e2e suite (external mode) on the real node: the simulator as the engine, and with NODE_ENGINE=vllm a pool of real vLLM (images/vllm-cpu) too
	bash hack/node.sh test $(PYTEST_ARGS)
