"""The quickstart through the real CLI: files, metrics, a plain-PEFT-loadable adapter, TensorBoard."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llama_lora.config.load import load_config_file
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_run_directory_contract(quickstart_run):
    names = {p.name for p in quickstart_run.iterdir()}
    expected = {"config.yaml", "run.json", "prompt.json", "adapter", "tokenizer", "metrics.json", "train.log", "tensorboard"}
    assert expected <= names
    assert not [n for n in names if ".tmp-" in n], names  # no half-written leftovers
    assert "checkpoints" not in names  # a finished run keeps its adapter, not its resume state
    assert {p.name for p in (quickstart_run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    status = json.loads((quickstart_run / "run.json").read_text())
    assert status["status"] == "finished"
    cfg = load_config_file(quickstart_run / "config.yaml")
    assert cfg.preset == "quickstart" and cfg.model.name_or_path == "embedded"
    assert json.loads((quickstart_run / "prompt.json").read_text())["kind"] == "chat"


def test_metrics_show_learning(quickstart_run):
    m = json.loads((quickstart_run / "metrics.json").read_text())
    assert m["steps"] == load_config_file(quickstart_run / "config.yaml").training.max_steps
    assert m["eval_loss"] < 0.7 * m["eval_loss_before"], m  # the loss clearly falls
    assert m["tokens_seen"] > m["response_tokens_seen"] > 0
    assert m["tokens_per_second"] > 0 and m["peak_memory_mb"] > 0 and m["wall_time_s"] > m["train_time_s"] > 0
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["device"] == "cpu" and m["precision"] == "fp32"


def test_adapter_loads_with_plain_peft_and_changes_outputs(quickstart_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_cfg = json.loads((quickstart_run / "adapter" / "adapter_config.json").read_text())
    base_path = adapter_cfg["base_model_name_or_path"]
    assert base_path == json.loads((quickstart_run / "run.json").read_text())["base_model"]
    tok = AutoTokenizer.from_pretrained(quickstart_run / "tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse the word.\n\napple"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, quickstart_run / "adapter").eval()
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-2
    # LoRA B starts at zero: every B matrix must have been trained away from it.
    weights = load_file(quickstart_run / "adapter" / "adapter_model.safetensors")
    b_mats = [v for k, v in weights.items() if "lora_B" in k]
    assert b_mats and all(v.abs().max() > 0 for v in b_mats)


def test_tensorboard_events_hold_the_logged_losses(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(quickstart_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/lr"} <= set(tags)
    train = acc.Scalars("train/loss")
    evals = acc.Scalars("eval/loss")
    m = json.loads((quickstart_run / "metrics.json").read_text())
    assert evals[0].step == 0 and evals[0].value == pytest.approx(m["eval_loss_before"], rel=1e-5)
    assert evals[-1].step == m["steps"] and evals[-1].value == pytest.approx(m["eval_loss"], rel=1e-5)
    assert train[-1].value < train[0].value
    assert [e.step for e in train] == sorted({e.step for e in train})


def test_second_run_with_same_name_is_refused_and_nothing_is_lost(quickstart_run):
    before = {p: p.stat().st_mtime_ns for p in quickstart_run.rglob("*") if p.is_file()}
    proc = run_cli("train", "experiment=quickstart", f"output_dir={quickstart_run.parent}",
                   f"run_name={quickstart_run.name}", check=False, timeout=300)
    assert proc.returncode == 2
    assert "finished run" in proc.stderr and "overwrite=true" in proc.stderr and "Traceback" not in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in quickstart_run.rglob("*") if p.is_file()}
    assert after == before


def test_resolved_config_is_complete_yaml(quickstart_run):
    data = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    assert set(data) >= {"model", "data", "peft", "training", "eval", "infer"}
    assert data["peft"]["method"] == "lora"
