"""PEFT adapter from our schema: build the LoraConfig, apply it, count what trains."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
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
        init_lora_weights=INIT_LORA_WEIGHTS[cfg.init],
        task_type="CAUSAL_LM",
    )


# peft.init -> PEFT's init_lora_weights. PiSSA runs the fast randomized SVD with 16 subspace iterations
# ("pissa_niter_16"): PEFT's LoraConfig documents that as initialising a 7B model in seconds with a
# training effect approximately equal to the full SVD ("pissa"), which takes minutes on such a model.
# It is seeded (train.py seeds before apply_adapter), so a resume derives the same residual base.
# loftq is applied after the layers exist (loftq_init, on the quantized base).
INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "olora": "olora",
                     "loftq": True}
# Inits that rewrite the base weights (W -> W - s B0 A0): their adapter is saved converted to a plain
# LoRA for the original base (artifacts.save_adapter).
MUTATES_BASE = ("pissa", "olora")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (what target_modules can name), lm_head excluded."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


# Inits that start from an SVD of each adapted weight: the rank cannot exceed the weight's smaller side.
SVD_INITS = ("pissa", "olora", "loftq")


def check_adapter_fits(model: torch.nn.Module, cfg: PeftConfig) -> None:
    """The adapter `cfg` can be built on `model` (a real or a meta-device one): every named target exists,
    and an SVD-based init's rank fits every adapted layer. Raises LlamaLoraError saying what to change."""
    available = linear_module_names(model)
    targets = available if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    missing = [t for t in targets if t not in available]
    if "lm_head" in missing:
        head = getattr(model, "lm_head", None)
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        raise LlamaLoraError(
            "peft.target_modules names lm_head, the output head"
            + (", which this model ties to its input embeddings (one shared weight)" if tied and head is not None else "")
            + ": llama-lora adapts the linear layers of the transformer blocks only. Remove lm_head from "
            f"peft.target_modules (its linear layers are {available}), or use peft.target_modules=all-linear.")
    if missing:
        raise LlamaLoraError(
            f"peft.target_modules names {missing}, which the model does not have. "
            f"Its linear layers are {available}; use some of those or peft.target_modules=all-linear."
        )
    if cfg.init in SVD_INITS:
        sizes = {n.rsplit(".", 1)[-1]: min(m.in_features, m.out_features) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}
        if sizes and cfg.r > min(sizes.values()):
            smallest = min(sizes, key=sizes.get)
            raise LlamaLoraError(
                f"peft.r={cfg.r} is larger than the adapted layer {smallest} allows with peft.init={cfg.init}: that "
                f"init starts from the layer's singular vectors, and {smallest} has only {sizes[smallest]} (the "
                f"smaller of its input and output sizes). Use peft.r={sizes[smallest]} or less, or leave "
                f"{smallest} out of peft.target_modules.")


def apply_adapter(model: PreTrainedModel, cfg: PeftConfig, lean: LeanPolicy | None = None) -> PeftModel:
    """The PEFT model of `cfg` on `model`. With a LeanPolicy that says lean (training: Runtime.lean), PEFT
    creates llama-lora's LeanLinear layers (llama_lora.lean) set to that policy; their parameters, names
    and saved files are PEFT's own. Without one (inference, merge), PEFT's own layers."""
    check_adapter_fits(model, cfg)
    peft_cfg = lora_config(cfg)
    if lean is not None and lean.lean:
        from llama_lora import lean as lean_lib

        lean_lib.register(peft_cfg)
    peft_model = get_peft_model(model, peft_cfg)
    if cfg.init == "loftq":
        n = loftq_init(peft_model)
        log.info("LoftQ: %d adapted 4-bit layers start at the rank-%d fit of their quantization error.", n, cfg.r)
    trainable, total = count_parameters(peft_model)
    log.info(
        "Adapter %s r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)",
        cfg.method, cfg.r, cfg.alpha, cfg.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    if lean is not None:
        n = lean_lib.attach(peft_model, lean) if lean.lean else 0
        log.info("Training step: %s%s.", lean.describe(), f"; {n} adapted layers run it" if lean.lean else "")
    # Every step, lean or PEFT's: each MLP is replaced by a LeanSwiGLU holding its very modules, which keeps
    # gate and up for the backward, not silu(gate) too (same outputs, gradients and state_dict keys; the
    # planner counts two intermediates per layer).
    from llama_lora.lean.swiglu import use_lean_swiglu

    use_lean_swiglu(peft_model)
    return peft_model


@torch.no_grad()
def loftq_init(model: PeftModel) -> int:
    """LoftQ (Li et al. 2023, one alternating step): every adapter on a 4-bit layer starts at the best rank-r
    fit of that layer's quantization error, s B A = rank-r SVD of (W - dequant(Q(W))), W being the original
    weight read from the base's safetensors. Returns how many layers it set.

    What PEFT's replace_lora_weights_loftq does, written here for two reasons: PEFT's runs the SVD on
    "cuda" (or XPU) unconditionally, so it cannot run on a CPU, and it sets B A to the error without the
    LoRA scale s = alpha/r, which overshoots it s-fold unless alpha = r. PEFT's own loader reads W
    (sharded or not, local folder or hub cache).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight
    from peft.utils.loftq_utils import _SafetensorLoader

    name_or_path = model.get_base_model().config._name_or_path
    loader = _SafetensorLoader(model, name_or_path if Path(name_or_path).is_dir() else None)
    adapter, count = model.active_adapter, 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or type(module.get_base_layer().weight).__name__ != "Params4bit":
            continue
        qweight = module.get_base_layer().weight
        original = loader.get_tensor(name.removeprefix("base_model.model.") + ".weight")
        error = original.to(qweight.device, torch.float32) - dequantize_bnb_weight(qweight, state=None).float()
        u, sv, vh = torch.linalg.svd(error, full_matrices=False)
        r, scale = module.r[adapter], module.scaling[adapter]
        root = sv[:r].sqrt()
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a.copy_((root[:, None] * vh[:r]).to(a.dtype))
        b.copy_((u[:, :r] * root / scale).to(b.dtype))
        count += 1
    if not count:
        raise LlamaLoraError("peft.init=loftq found no 4-bit adapted layer: it needs model.quantization=nf4 or fp4.")
    return count


def initial_adapter_state(model: PeftModel, cfg: PeftConfig) -> dict[str, torch.Tensor] | None:
    """The freshly initialised adapter (A0, B0, PEFT's saved key names, on the CPU) of an init that rewrote
    the base weights (pissa, olora), else None. Taken right after apply_adapter, before any checkpoint is
    loaded: it belongs to the base this process derived (W - s B0 A0), which is what a save converts
    against, so a resumed run (same seed, same derived base) converts correctly too."""
    if cfg.init not in MUTATES_BASE:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: PeftModel, directory: Path, state_dict: dict | None = None,
                 initial: dict[str, torch.Tensor] | None = None) -> None:
    """Save the adapter in PEFT's format; with `initial` (initial_adapter_state), converted by PEFT
    (save_pretrained's path_initial_model_for_weight_conversion) to the plain LoRA of rank 2r that gives
    the trained model on the ORIGINAL base: [A | A0], [B | -B0], so that s'B'A' = s(BA - B0A0)."""
    if initial is None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        # PEFT loads this folder as an adapter named after it (a module key: no dots).
        init_dir = Path(tmp) / "initial"
        init_dir.mkdir()
        init_config = copy.deepcopy(model.peft_config[model.active_adapter])
        init_config.init_lora_weights = True  # loaded as it is, not initialised again (PEFT's requirement)
        init_config.save_pretrained(init_dir)
        save_file({k: v.contiguous() for k, v in initial.items()}, init_dir / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict,
                              path_initial_model_for_weight_conversion=str(init_dir))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
