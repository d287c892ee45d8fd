"""The embedded default: a tiny Llama base model, tokenizer and instruction data set that the
project builds itself, so that everything works offline.

They are materialised into a cache directory with ``save_pretrained`` / JSONL files and then
loaded by the same code that loads hub models and data sets. The directory names carry a
version: change the recipe -> bump the version -> a fresh directory is built.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .base_model import build_base_model
from .data import FINETUNE_TASKS, PRETRAIN_TASKS, generate_splits, write_jsonl
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

BASE_MODEL_DIRNAME = "tiny-llama-v3"
DATASET_DIRNAME = "embedded-instructions-v3"
SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")
# Sizes of the embedded data set (balanced over the FINETUNE_TASKS families).
DATASET_SIZES = {"n_train": 3200, "n_validation": 200, "n_test": 400}

__all__ = [
    "FINETUNE_TASKS",
    "PRETRAIN_TASKS",
    "build_base_model",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_base_model",
    "ensure_dataset",
    "generate_splits",
    "write_jsonl",
]


def default_cache_dir() -> Path:
    """``$LLAMA_LORA_CACHE`` if set, else ``~/.cache/llama_lora``."""
    env = os.environ.get("LLAMA_LORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama_lora"


def check_cache_dir(root: Path) -> None:
    """Before building into the cache (minutes of pre-training): it must be a folder we can write."""
    from llama_lora.artifacts import check_writable
    from llama_lora.errors import LlamaLoraError

    where = "LLAMA_LORA_CACHE" if os.environ.get("LLAMA_LORA_CACHE") else "the default cache"
    existing = next(p for p in [root, *root.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        root.mkdir(parents=True, exist_ok=True)
        check_writable(root)
    except OSError as e:
        raise LlamaLoraError(
            f"The embedded model and data are built into {root} ({where}), but {existing} "
            f"{'is a file, not a folder' if not existing.is_dir() else f'cannot be written ({e.strerror})'}. "
            "Point LLAMA_LORA_CACHE at a writable folder (export LLAMA_LORA_CACHE=~/.cache/llama_lora), or unset it."
        ) from e


def ensure_base_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the embedded base model (``<cache>/tiny-llama-v3``), installed from the shipped weights on first use."""
    from .base_model import complete

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not complete(root / BASE_MODEL_DIRNAME):
        check_cache_dir(root)
    return build_base_model(root / BASE_MODEL_DIRNAME)  # returns at once when already built


def ensure_dataset(cache_dir: str | Path | None = None) -> Path:
    """Directory (``<cache>/embedded-instructions-v3``) holding train/validation/test JSONL files.

    Generated on first use into a temporary sibling, then renamed into place, so readers
    never see a partial data set.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / DATASET_DIRNAME
    if all((out / name).is_file() for name in SPLIT_FILES):
        return out
    check_cache_dir(root)
    logger.info("generating the embedded instruction data set into %s", out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_jsonl(generate_splits(seed=0, **DATASET_SIZES), tmp)
        if not all((out / name).is_file() for name in SPLIT_FILES):  # else another process won
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
