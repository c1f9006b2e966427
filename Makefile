# The two commands of the README: `make serve` and `make test`. Both install what they need
# into .venv/ on a fresh machine (a stamp file makes the second run instant).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PORT   ?= 8000

.PHONY: serve test test-deps e2e bench bench-quick system-deps cluster-binaries images clean test-lower-bounds

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The server alone (PyTorch backend and the embedded default model).
$(VENV)/.installed-server: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[server]'
	touch $@

# Everything: server, MLX (mlx[cpu] on Linux), operator, test tools.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[server,mlx,operator,gateway,dev]'
	touch $@ $(VENV)/.installed-server

serve: $(VENV)/.installed-server
	$(VENV)/bin/reranker serve --port $(PORT)

# Debian packages the tests start for real (redis-server, prometheus, promtool).
system-deps:
	bash hack/install-system-deps

# The Kubernetes control plane for the operator tests and the node for the end-to-end tests are
# built from the Kubernetes Go modules once (cached under ~/.cache/reranker-fleet; 6-23 min cold
# on 2 cores for the control plane, plus the node's), see docs/cluster.md.
cluster-binaries:
	hack/cluster build
	hack/cluster metrics build

# Container images with buildah (no Docker daemon, no registry; root): reranker-fleet/server:dev
# (OpenVINO, no torch), server:dev-torch (CPU torch), gateway:dev, operator:dev and redis:dev,
# docker-archives under ~/.cache/reranker-fleet/images, loaded into the dev node when one runs.
# docs/images.md.
#   make images REGISTRY=ghcr.io/acme/reranker-fleet TAG=0.1.0 PUSH=1    build and push
#   make images TORCH_VARIANT=cuda                                 server:TAG-cuda, not -torch
REGISTRY      ?= reranker-fleet
TAG           ?= dev
TORCH_VARIANT ?= cpu
PUSH          ?=
images: system-deps
	REGISTRY=$(REGISTRY) TAG=$(TAG) TORCH_VARIANT=$(TORCH_VARIANT) hack/images
	$(if $(filter 1 yes true,$(PUSH)),REGISTRY=$(REGISTRY) TAG=$(TAG) TORCH_VARIANT=$(TORCH_VARIANT) hack/images push)

# What the suite needs is built side by side: the Go builds (control plane, node, Prometheus,
# prometheus-adapter) keep the CPUs busy while the venv and the images mostly wait on downloads
# and the disk (a cold `make test`: docs/cluster.md). Warm, each is a check of a few seconds.
# The end-to-end tests run after the rest (their node and metrics path are the heaviest; the
# suite measured green in this order): both runs must pass.
test-deps: system-deps
	$(MAKE) -j3 $(VENV)/.installed-dev cluster-binaries images

test: test-deps
	$(PY) -m pytest --ignore=tests/e2e $(PYTEST_ARGS)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Only the end-to-end tests: a real node, the images, the chart (tests/e2e; part of `test`).
e2e: test-deps
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench-quick: $(VENV)/.installed-dev
	$(PY) bench/run.py --quick

bench: $(VENV)/.installed-dev
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache

# Every dependency at its declared lower bound, in a fresh venv (.lower-bounds/), then every test
# that needs no Kubernetes control plane: the bounds in pyproject.toml are ones the code works
# with. Large downloads (PyTorch and its CUDA libraries from PyPI), ~8 min here: not part of
# `make test`. docs/dependencies.md.
test-lower-bounds: system-deps
	python3 hack/lower_bounds.py
