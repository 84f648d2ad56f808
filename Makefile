# gpuvisor: `make run` serves the daemon, `make test` runs the suite (`make
# test-unit` its unit layer alone: seconds, no process). They set up their own
# virtualenv on a fresh machine; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
# torch is pinned and installed first: on this project's CPU machines the pin
# resolves to a CPU wheel. For a GPU box see README.md ("GPU install").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ray Serve's deployment (contrib/ray, with Ray itself: a few hundred MB) only
# for the suite, which tests it: `make install` leaves it out.
RAY_STAMP := $(VENV)/.installed-ray

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run demo test test-unit bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[models,http,dev]'
	touch $(STAMP)

$(RAY_STAMP): $(STAMP) contrib/ray/pyproject.toml
	$(PY) -m pip install --quiet -e ./contrib/ray
	touch $(RAY_STAMP)

run: install
	$(VENV)/bin/gpuvisor serve

demo: install
	$(VENV)/bin/gpuvisor demo

test: install $(RAY_STAMP)
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m unit

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
