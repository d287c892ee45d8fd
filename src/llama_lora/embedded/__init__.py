"""The offline default: a tiny pre-trained Llama, its tokenizer, and generated instruction data.

Everything is built on first use into a cache directory and then loaded through the ordinary
`from_pretrained` / data-file code paths that hub models and user files take.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# Bump a suffix when its recipe changes, so a stale cache is never reused.
BASE_MODEL_DIR = "tiny-llama-v1"
DATASET_DIR = "embedded-instructions-v1"
SPLIT_SIZES = {"n_train": 2000, "n_validation": 200, "n_test": 200}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_LORA_CACHE") or Path.home() / ".cache" / "llama_lora").expanduser()


def ensure_base_model(cache_dir: str | Path | None = None) -> Path:
    """<cache>/tiny-llama-v1, built (and pre-trained) the first time it is asked for."""
    from llama_lora.embedded.base_model import build_base_model, complete

    path = Path(cache_dir or default_cache_dir()) / BASE_MODEL_DIR
    if not complete(path):
        log.info("Building the embedded tiny Llama in %s (once; about a minute or two on CPU)", path)
        build_base_model(path)
    return path


def ensure_dataset(cache_dir: str | Path | None = None) -> Path:
    """<cache>/embedded-instructions-v1 with train/validation/test.jsonl, generated if missing."""
    from llama_lora.embedded.data import generate_splits, write_jsonl

    path = Path(cache_dir or default_cache_dir()) / DATASET_DIR
    if all((path / f"{s}.jsonl").is_file() for s in ("train", "validation", "test")):
        return path
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_jsonl(generate_splits(seed=0, **SPLIT_SIZES), tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
