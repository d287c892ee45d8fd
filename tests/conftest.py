"""Shared fixtures: the embedded model/data (built once, cached), a tiny barely-trained base for fast
unit tests, and one real quickstart run through the CLI that many tests read."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

# Never touch the network from tests, and keep the embedded cache inside the checkout (set before any
# import below can read them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLAMA_LORA_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llama_lora"))

pytest.register_assert_rewrite("tests.helpers")  # before the import: its asserts report like a test's

from tests.helpers import run_cli  # noqa: E402

# Tests that import PEFT or bitsandbytes directly get the same built-in kernels, with no Hub fetch, as the CLI.
from llama_lora.model import import_bitsandbytes  # noqa: E402

import_bitsandbytes()


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from llama_lora.embedded import ensure_base_model

    return ensure_base_model()


@pytest.fixture(scope="session")
def embedded_data() -> Path:
    from llama_lora.embedded import ensure_dataset

    return ensure_dataset()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as the embedded model, 2 pre-training steps: for fast tests."""
    from llama_lora.embedded.base_model import build_base_model

    return build_base_model(tmp_path_factory.mktemp("tiny") / "base", pretrain_steps=2)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, embedded_model, embedded_data) -> Path:
    """One real `llama-lora train experiment=quickstart` in a subprocess, shared by all tests that read a run."""
    out = tmp_path_factory.mktemp("outputs")
    run_cli("train", "experiment=quickstart", f"output_dir={out}", "run_name=qs")
    return out / "qs"


class _CurrentStderr:
    """A stream that is whatever sys.stderr is now (pytest swaps it for every test)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _logging_follows_pytest_stderr():
    """For tests calling cli.main in-process: its logging.basicConfig, and `datasets` on import, bind a
    handler to the sys.stderr of the test that ran first; later tests would get "--- Logging error ---"
    tracebacks from that closed capture stream in their output."""
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for h in (h for lg in loggers for h in lg.handlers):
        if type(h) is logging.StreamHandler and h.stream not in (sys.__stderr__, sys.__stdout__):
            h.stream = _CurrentStderr()  # not setStream(): it flushes the closed stream first
    yield
