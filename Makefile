# The two commands that set everything up: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export ONNXPIPE_HOME := $(CURDIR)/exports
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo models bench man clean

venv: $(STAMP)

# torch goes in first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[export,test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

models: venv
	$(PY) benchmarks/../scripts/models.py 2>/dev/null || true

clean:
	rm -rf $(VENV) build *.egg-info

man: venv
	$(PY) man/build.py
