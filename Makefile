# Two commands do all the set-up (see the README):
#   make pipeline   set up, then run SFT -> RM -> PPO on the built-in tiny default
#   make test       set up, then run the tests
# Set-up makes a virtual environment in .venv (VENV=... to change it) and installs the project.
# torch is pinned to 2.13.0 first: an unpinned torch would pull the newest CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup pipeline test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,deepspeed]'
	touch $@

pipeline: setup
	$(PY) launch/pipeline.py

test: setup
	$(PY) -m pytest -q
