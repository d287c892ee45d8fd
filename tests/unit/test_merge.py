"""merge in-process: the base's dtype kept (bf16), and refused loudly, leaving nothing behind, when the
adapter is not finite or corrupted. The `llama-lora merge` command itself (LoRA, DoRA, a tampered
adapter) runs in tests/integration/test_merge_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_lora import merge
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.runs import saved_config
from tests.helpers import make_run


def bf16_base(base: Path, root: Path) -> Path:
    out = root / "base-bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def test_merge_keeps_bf16_base_dtype(tmp_path, tiny_base):
    base = bf16_base(tiny_base, tmp_path)
    run = make_run(tmp_path, base, "lora", dtype=torch.bfloat16)
    out = merge.run(saved_config(run, [], "merge"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    report = json.loads((out / "merge.json").read_text())
    assert report["dtype"] == "bfloat16" and report["max_abs_logit_diff"] <= report["tolerance"]


def test_non_finite_adapter_is_refused(tmp_path, tiny_base):
    run = make_run(tmp_path, tiny_base, "lora")
    path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, path)
    with pytest.raises(LlamaLoraError, match="not finite"):
        merge.run(saved_config(run, [], "merge"))
    assert not (run / "merged").exists() and not list(run.glob(".merged*"))


def test_corrupted_adapter_file_gives_clear_error(tmp_path, tiny_base):
    run = make_run(tmp_path, tiny_base, "lora")
    path = run / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])  # a truncated download / disk error
    with pytest.raises(LlamaLoraError, match="corrupted") as e:
        merge.run(saved_config(run, [], "merge"))
    assert str(run / "adapter") in str(e.value)
    assert not (run / "merged").exists()


def test_merge_refuses_a_merged_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LlamaLoraError, match="no adapter to merge"):
        merge.run(Config(infer={"run_dir": str(tmp_path)}))
