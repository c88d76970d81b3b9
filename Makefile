# Each command does its own set-up on a fresh clone (Python 3.11 and make are all they need):
#   make run       generate with the default model (downloaded on first use)
#   make test      the quick tests: no real weights, no model download (~6 minutes on 2 cores)
#   make test-all  every test, as CI runs them (~15 minutes; fetches SmolLM2 and Qwen2.5-Coder-0.5B)
#   make test-gpu  the tests that need a CUDA GPU (install a CUDA torch: see TORCH below)
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: unpinned, pip may pick a multi-GB CUDA build. On a CUDA
# machine use e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH ?= torch==2.13.0
# everything else at the versions the suite last passed with
CONSTRAINTS := constraints.txt
PROMPT ?= What is the capital of France?
BIN := $(VENV)/bin

.PHONY: run test test-all test-gpu clean

run: $(VENV)/.installed
	$(BIN)/python generate.py "$(PROMPT)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

# On a machine whose own python3 already has a CUDA torch, triton and transformers (and no network):
#   make test-gpu TEST_PYTHON=python3
TEST_PYTHON ?= $(BIN)/python
test-gpu: $(if $(filter $(BIN)/python,$(TEST_PYTHON)),$(VENV)/.installed-test)
	$(TEST_PYTHON) -m pytest -q -m gpu tests

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) *.egg-info
