# Two commands do all the set-up on a fresh clone (Python 3.11 and make are all they need):
#   make run    generate with the default model (downloaded on first use)
#   make test   the whole test suite
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and pinned: unpinned, pip may pick a multi-GB CUDA build. On a CUDA
# machine use e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?
BIN := $(VENV)/bin

.PHONY: run test clean

run: $(VENV)/.installed
	$(BIN)/python generate.py "$(PROMPT)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) *.egg-info
