"""training.auto_batch_size through a real `llama-lora train` (subprocess): the planner picks the largest
micro-batch that fits the memory budget, keeps the global batch, and says so in train.log. The planner's
arithmetic itself is checked in tests/unit/test_planner.py."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_train_auto_batch_size_picks_a_divisor_and_logs_it(tmp_path, embedded_model, embedded_data):
    from transformers import AutoConfig

    from llama_lora import data as data_lib, model as model_lib
    from llama_lora.config.load import load_config, load_config_file
    from llama_lora.planner import largest_micro_batch

    # A budget between the plans for 2 and 3 examples per forward pass, from the real tokenized data.
    overrides = ["experiment=quickstart", "training.max_steps=2", "training.eval_every=0", "data.max_eval_examples=8"]
    cfg = load_config(overrides)
    tok = model_lib.load_tokenizer(str(embedded_model), cfg.model)
    train_ds, _ = data_lib.load_train_eval(cfg.data, cfg.training.seed)
    examples, _ = data_lib.tokenize_dataset(train_ds, cfg.data, tok, data_lib.PromptFormat.choose(cfg.data, tok))
    lengths = [len(e["input_ids"]) for e in examples]
    mc = AutoConfig.from_pretrained(embedded_model)
    _, two = largest_micro_batch(cfg, mc, "cpu", lengths, upper=2)
    _, three = largest_micro_batch(cfg, mc, "cpu", lengths, upper=3)
    budget = (two.total_bytes + three.total_bytes) / 2 / 2**30
    run_cli("train", *overrides, "training.auto_batch_size=true", f"training.memory_budget_gb={budget}",
            f"output_dir={tmp_path}", "run_name=auto")
    log = (tmp_path / "auto" / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "auto_batch_size: micro-batch" in ln)
    # Quickstart configures 16 x 1: 2 examples fit, 3 do not -> 2 x 8 accumulation, same global batch.
    assert "micro-batch 2 x 8 accumulation (configured 16 x 1)" in line, line
    assert "global batch 16 (2 x 8 accumulation" in log  # the loop runs with the chosen split
    assert (tmp_path / "auto" / "adapter" / "adapter_model.safetensors").exists()
    # config.yaml records the config that ran (the chosen split), not the configured one.
    saved = load_config_file(tmp_path / "auto" / "config.yaml").training
    assert (saved.micro_batch_size, saved.gradient_accumulation_steps, saved.auto_batch_size) == (2, 8, True)
