"""A real pre-trained instruct model through the CLI: a few LoRA steps lower its loss, infer stops at its own
end-of-turn token (<|im_end|>, not Llama 3's), and merge verifies."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory, embedded_data):
    out = tmp_path_factory.mktemp("smol-out")
    run_cli("train", f"model.name_or_path={smollm2}", "data.source=embedded", "data.train_split='train[:48]'",
            "data.eval_split='validation[:16]'", "training.max_steps=8", "training.micro_batch_size=6",
            "training.gradient_accumulation_steps=1", "training.learning_rate=2e-3", "training.warmup_ratio=0",
            "training.eval_every=0", "training.save_every=0", "training.report_to=[]", "peft.r=8", "peft.alpha=16",
            "peft.target_modules=[q_proj,v_proj]", f"output_dir={out}", "run_name=smol", timeout=600)
    return out / "smol"


def test_a_few_steps_lower_the_loss(smol_run):
    m = json.loads((smol_run / "metrics.json").read_text())
    assert m["steps"] == 8 and m["eval_loss"] < m["eval_loss_before"], m


def test_infer_stops_at_the_models_own_end_of_turn(smol_run):
    from llama_lora import runs
    from llama_lora.generation import generation_config

    cfg = runs.command_config("infer", [], str(smol_run))
    loaded = runs.load(cfg)
    tok = loaded.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = generation_config(loaded.model, tok, 48)
    assert im_end in gen.eos_token_id
    prompt = loaded.fmt.prompt(tok, "Uppercase the word.", "garden")
    assert prompt.endswith("<|im_start|>assistant\n")  # SmolLM2's ChatML, not a Llama 3 header
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**enc, generation_config=gen)[0, enc["input_ids"].shape[1]:].tolist()
    assert im_end in out and len(out) < 48, tok.decode(out)  # ended by its own token, not by the length cap

    proc = run_cli("infer", "Uppercase the word.", "--input", "garden", f"run_dir={smol_run}",
                   "infer.max_new_tokens=48")
    assert proc.stdout.strip() and "<|im_end|>" not in proc.stdout


def test_merge_verifies(smol_run):
    proc = run_cli("merge", str(smol_run), timeout=600)
    assert (smol_run / "merged" / "config.json").is_file(), proc.stderr
