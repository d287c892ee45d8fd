# make quickstart: venv + install + offline fine-tune of the embedded tiny Llama (a few minutes on CPU).
# make test:       venv + dev install + the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The local CPU build on these machines; on a GPU box use e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(EXTRAS)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast bench clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/llama-lora train experiment=quickstart

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
