"""PEFT adapter from our schema: build the LoraConfig, apply it, count what trains."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from llama_lora.config.schema import PeftConfig
from llama_lora.errors import LlamaLoraError

if TYPE_CHECKING:
    from llama_lora.lean import LeanPolicy

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


def apply_adapter(model: PreTrainedModel, cfg: PeftConfig, lean: LeanPolicy | None = None) -> PeftModel:
    """The PEFT model of `cfg` on `model`. With a LeanPolicy that says lean (training: Runtime.lean), PEFT
    creates llama-lora's LeanLinear layers (llama_lora.lean) set to that policy; their parameters, names
    and saved files are PEFT's own. Without one (inference, merge), PEFT's own layers."""
    check_target_modules(model, cfg)
    peft_cfg = lora_config(cfg)
    if lean is not None and lean.lean:
        from llama_lora import lean as lean_lib

        lean_lib.register(peft_cfg)
    peft_model = get_peft_model(model, peft_cfg)
    trainable, total = count_parameters(peft_model)
    log.info(
        "Adapter %s r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
        cfg.method, cfg.r, cfg.alpha, cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    if lean is not None:
        n = lean_lib.attach(peft_model, lean) if lean.lean else 0
        log.info("Training step: %s%s.", lean.describe(), f"; {n} adapted layers run it" if lean.lean else "")
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
