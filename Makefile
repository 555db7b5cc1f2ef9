# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both depend on `make setup`, which is idempotent: it reinstalls only when the lock file or pyproject change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo demo-vae test lint bench clean docker-engine images test-containers

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exact: the local CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.lock
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: local MLflow, sample data, the whole Kubeflow pipeline locally (tiny), registry, Triton, a video.
demo: setup
	GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/easyanimate demo --out outputs/demo

# Re-make the VAE the demo starts from (easyanimate/presets/weights/demo_vae, `train.vae.init_from: bundled:demo_vae`)
# on the training split of the last `make demo` run's dataset: bench/demo_vae.py, about 45 min on 2 cores, resumable.
demo-vae: setup
	@data=$$(ls -d outputs/demo/kfp/*/merge/dataset 2>/dev/null | tail -1); \
	test -n "$$data" || { echo "error: expected a dataset from 'make demo' under outputs/demo/kfp, found none" >&2; exit 2; }; \
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/demo_vae.py --data "$$data"

# Browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# OMP_WAIT_POLICY=PASSIVE: test processes (pytest, MLflow, Triton stubs, kfp steps) share 2 cores; OpenMP threads that
# spin while they wait made tiny steps 10-40x slower there (README, "The demo").
test: setup browser
	GRADIO_ANALYTICS_ENABLED=False OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q

# Containers (README "Containers"): a Docker engine (installed and started here when missing: no bridge network,
# containers use the host's loopback), both images from one CUDA flavour, then the container tests.
FLAVOUR ?= cpu
REGISTRY ?=
docker-engine:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null)
	@docker info >/dev/null 2>&1 || { (setsid dockerd --bridge=none --iptables=false --ip-masq=false \
		>/tmp/easyanimate-dockerd.log 2>&1 &); for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; \
		sleep 1; done; docker info >/dev/null 2>&1 || { tail -20 /tmp/easyanimate-dockerd.log; exit 1; }; }

images: setup docker-engine
	FLAVOUR=$(FLAVOUR) REGISTRY=$(REGISTRY) PY=$(PY) infra/docker/build_images.sh

test-containers: images
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q -m containers tests/containers

lint: setup
	$(VENV)/bin/ruff check easyanimate components pipelines serving tests bench

bench: setup
	$(PY) bench/vae_decode_memory.py

clean:
	rm -rf outputs .pytest_cache
