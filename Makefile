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

# The quickstart needs only the package itself (no dev extras: a smaller first install); any install of the
# current pyproject.toml (e.g. `make install`'s dev one) already has it.
CORE_STAMP := $(VENV)/.installed-core-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
QS_STAMP := $(or $(firstword $(wildcard $(VENV)/.installed-*-$(shell cat pyproject.toml | cksum | cut -d' ' -f1))),$(CORE_STAMP))

$(CORE_STAMP): $(VENV)/bin/python pyproject.toml
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e .
	touch $(CORE_STAMP)

# Fine-tune, then show what it learned: base vs fine-tuned, per task family, on the held-out test split.
quickstart: $(QS_STAMP)
	$(VENV)/bin/llama-lora train experiment=quickstart
	$(VENV)/bin/llama-lora eval
	@echo ""
	@echo "Next, try:"
	@echo "  $(VENV)/bin/llama-lora infer \"Reverse the word.\" --input garden   # talk to the fine-tuned run"
	@echo "  $(VENV)/bin/llama-lora infer                                      # chat with it (/exit ends)"
	@echo "  $(VENV)/bin/llama-lora merge outputs/<run>                         # a standalone model"
	@echo "  $(VENV)/bin/llama-lora experiment experiment=compare_lora_dora     # LoRA vs DoRA, ranks 4 and 16"

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
