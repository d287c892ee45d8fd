# make quickstart: venv + install + offline fine-tune of the embedded tiny Llama (a few minutes on CPU).
# make test:       venv + dev install + the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The local CPU build on these machines; on a GPU box use e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
# The versions the test suite last passed with (pip constraints, refreshed by `make lock`). LOCK=0 installs
# the newest versions pyproject.toml allows instead, e.g. `make test LOCK=0`.
LOCK ?= 1
LOCK_FILE := requirements/lock.txt
CONSTRAINTS := $(if $(filter 1,$(LOCK)),-c $(LOCK_FILE))
# A new pyproject.toml, lock file or LOCK choice reinstalls.
DEPS_KEY := $(shell cat pyproject.toml $(LOCK_FILE) | cksum | cut -d' ' -f1)-lock$(LOCK)
STAMP := $(VENV)/.installed-$(EXTRAS)-$(DEPS_KEY)
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast bench lock clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml $(LOCK_FILE)
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]" $(CONSTRAINTS)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# The quickstart needs only the package itself (no dev extras: a smaller first install); any install of the
# current pyproject.toml (e.g. `make install`'s dev one) already has it.
CORE_STAMP := $(VENV)/.installed-core-$(DEPS_KEY)
QS_STAMP := $(or $(firstword $(wildcard $(VENV)/.installed-*-$(DEPS_KEY))),$(CORE_STAMP))

$(CORE_STAMP): $(VENV)/bin/python pyproject.toml $(LOCK_FILE)
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e . $(CONSTRAINTS)
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

# Refresh the lock: the newest allowed versions in a fresh venv, frozen (torch stays TORCH_SPEC's). Run the
# suite on it (`make test`) before committing requirements/lock.txt (docs/reliability.md, "Installs").
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	{ echo "# pip constraints: the versions the test suite passed with (Python 3.11, Linux x86-64, CPU torch)."; \
	  echo "# Used by make install/test/quickstart and .ci/run; refresh with \`make lock\`. torch: TORCH_SPEC."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -vi '^torch=='; } > $(LOCK_FILE)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf outputs .pytest_cache
