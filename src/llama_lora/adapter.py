"""PEFT adapter from our schema: build the LoraConfig, apply it, count what trains."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from llama_lora.config.schema import PeftConfig
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)


def lora_config(cfg: PeftConfig) -> LoraConfig:
    # DoRA is a flag on LoRA in PEFT (as in the paper: LoRA on the direction plus a magnitude vector).
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.method == "dora",
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (what target_modules can name), lm_head excluded."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def check_target_modules(model: torch.nn.Module, cfg: PeftConfig) -> None:
    if cfg.target_modules == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise LlamaLoraError(
            f"peft.target_modules names {missing}, which the model does not have. "
            f"Its linear layers are {available}; use some of those or peft.target_modules=all-linear."
        )


def apply_adapter(model: PreTrainedModel, cfg: PeftConfig) -> PeftModel:
    check_target_modules(model, cfg)
    peft_model = get_peft_model(model, lora_config(cfg))
    trainable, total = count_parameters(peft_model)
    log.info(
        "Adapter %s r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
        cfg.method, cfg.r, cfg.alpha, cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
