"""A finished run directory as train.py leaves it, made without training (for fast tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_lora.config.load import to_yaml
from llama_lora.config.schema import Config


def make_run(root: Path, base: Path, method: str = "lora", targets=("q_proj", "v_proj", "down_proj"),
             dtype: torch.dtype = torch.float32, data: Path | None = None, alpha: float = 8) -> Path:
    """A finished run directory as train.py leaves it, with a random (clearly non-zero) adapter.

    A large `alpha` makes the adapter dominate the barely-trained base, so generations vary.
    """
    run = root / f"run-{method}-{str(dtype)[6:]}"
    cfg = Config(model={"name_or_path": str(base)}, data={"source": str(data or root), "train_split": "train"},
                 peft={"method": method, "target_modules": list(targets)})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "run.json").write_text(json.dumps({"status": "finished", "base_model": str(base)}))
    (run / "prompt.json").write_text(json.dumps({"kind": "chat", "system_prompt": None}))
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, target_modules=list(targets),
                                                  use_dora=method == "dora", init_lora_weights=False))
    if method == "dora":  # a trained magnitude differs from the weight norm it starts at
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.data *= 1 + 0.3 * torch.rand_like(p)
    peft_model.save_pretrained(run / "adapter")
    return run
