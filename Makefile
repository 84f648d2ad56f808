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
# Debian's headless browser and Prometheus, for the status page's browser test
# and the real-Prometheus test: installed with apt-get when this runs as root
# on a Debian-like machine (as CI does), else those tests skip and say why.
SYSTEM_TOOLS := chromium chromium-driver prometheus
SYSTEM_STAMP := $(VENV)/.installed-system

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

# The status page for a browser on this machine: http://127.0.0.1:$(UI_PORT)/ui
UI_PORT ?= 8421

run: install
	$(VENV)/bin/gpuvisor serve --ui 127.0.0.1:$(UI_PORT)

demo: install
	$(VENV)/bin/gpuvisor demo

$(SYSTEM_STAMP):
	@mkdir -p $(VENV)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v promtool >/dev/null; then \
		echo "system tools: already here"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "system tools: apt-get install $(SYSTEM_TOOLS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_TOOLS) >/dev/null \
			|| echo "system tools: apt-get failed; the browser and Prometheus tests will skip"; \
	else \
		echo "system tools: not root or no apt-get; the browser and Prometheus tests will skip"; \
	fi
	touch $(SYSTEM_STAMP)

# apt-get runs beside pip (the venv's install), not after it: a minute less.
test:
	@$(MAKE) --no-print-directory -j3 $(STAMP) $(RAY_STAMP) $(SYSTEM_STAMP)
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
