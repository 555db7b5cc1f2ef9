# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both depend on `make setup`, which is idempotent: it reinstalls only when the lock file or pyproject change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench clean

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

# Browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: setup browser
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check easyanimate components pipelines serving tests bench

bench: setup
	$(PY) bench/vae_decode_memory.py

clean:
	rm -rf outputs .pytest_cache
