"""`llama-lora merge` through a real subprocess: a standalone model loadable with plain transformers,
equal to base+adapter (LoRA, DoRA), and refused loudly, leaving nothing behind, when the adapter is
inconsistent. The in-process merge checks are in tests/unit/test_merge.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import make_run, run_cli


def unmerged_logits(run: Path, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "run.json").read_text())["base_model"], dtype=dtype)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_cli_matches_base_plus_adapter(tmp_path, tiny_base, method):
    run = make_run(tmp_path, tiny_base, method)
    proc = run_cli("merge", str(run))
    assert "max |logit diff|" in proc.stdout

    merged = run / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "prompt.json", "merge.json"} <= names
    assert "adapter_config.json" not in names and not list(tmp_path.rglob(".merged.tmp-*"))
    # Plain transformers, no PEFT: same logits as base+adapter on text the check never saw.
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.float32
    ids = AutoTokenizer.from_pretrained(merged)("a different text, 12 + 30 = 42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = unmerged_logits(run, ids)
    assert (got - want).abs().max() < 1e-4
    report = json.loads((merged / "merge.json").read_text())
    assert report["method"] == method.upper().replace("DORA", "DoRA").replace("LORA", "LoRA")
    assert report["max_abs_logit_diff"] < 1e-4 < report["adapter_max_logit_change"]  # the adapter matters


def _add_tied_head_adapter(run: Path) -> None:
    """Tamper: add an lm_head adapter to a run whose base ties lm_head to the input embeddings.

    Unmerged, the embeddings stay as they are; merged, the shared matrix changes for both, so the
    merged model computes something else (PEFT issue #2777). Verification must catch it.
    """
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(set(cfg["target_modules"]) | {"lm_head"})
    cfg_path.write_text(json.dumps(cfg))
    weights_path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_path)
    emb = AutoModelForCausalLM.from_pretrained(json.loads((run / "run.json").read_text())["base_model"]).lm_head.weight
    g = torch.Generator().manual_seed(1)
    weights["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, emb.shape[1], generator=g) * 0.1
    weights["base_model.model.lm_head.lora_B.weight"] = torch.randn(emb.shape[0], 4, generator=g) * 0.1
    save_file(weights, weights_path)


def test_tampered_adapter_fails_verification_loudly(tmp_path, tiny_base):
    run = make_run(tmp_path, tiny_base, "lora")
    _add_tied_head_adapter(run)
    proc = run_cli("merge", f"run_dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "Merge verification failed" in err and "tied to the input embeddings" in err
    assert not (run / "merged").exists() and not list(run.glob(".merged*"))  # nothing left behind
