"""Base model and tokenizer at the right device, dtype and attention kernel. Knows nothing of adapters."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llama_lora.config.schema import EMBEDDED, ModelConfig, TrainingConfig
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers; a plain value so the device matrix can be tested with fakes."""

    cuda: bool = False
    cuda_device_count: int = 0
    cuda_bf16: bool = False
    cuda_capability: tuple[int, int] = (0, 0)
    mps: bool = False
    flash_attn: bool = False


def probe_capabilities() -> Capabilities:
    cuda = torch.cuda.is_available()
    return Capabilities(
        cuda=cuda,
        cuda_device_count=torch.cuda.device_count() if cuda else 0,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        cuda_capability=torch.cuda.get_device_capability() if cuda else (0, 0),
        mps=bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
    )


@dataclass(frozen=True)
class Runtime:
    """Device, precision and kernels chosen for a run, and the one log line that explains why."""

    device: str
    precision: str  # fp32 | bf16 | fp16: the compute (autocast) precision
    model_dtype: torch.dtype  # dtype of the frozen base weights
    attn_implementation: str
    grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not
    pin_memory: bool
    fused_adamw: bool
    tf32: bool
    reason: str = field(default="", compare=False)


def choose_runtime(training: TrainingConfig, model: ModelConfig, caps: Capabilities) -> Runtime:
    """Pick device -> precision -> attention from the config and the machine (pure function)."""
    device = training.device
    if device == "auto":
        device = "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if device == "cuda" and not caps.cuda:
        raise LlamaLoraError("training.device=cuda but no CUDA GPU is visible. Use training.device=auto or cpu.")
    if device == "mps" and not caps.mps:
        raise LlamaLoraError("training.device=mps but MPS is not available. Use training.device=auto or cpu.")

    precision = training.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if caps.cuda_bf16 else "fp16"
        else:
            # CPU bf16 matmuls are slow without AMX and MPS bf16 support is patchy: fp32 unless asked.
            precision = "fp32"
    if precision == "bf16" and device == "cuda" and not caps.cuda_bf16:
        raise LlamaLoraError(
            f"training.precision=bf16 but this GPU (compute capability {caps.cuda_capability}) has no bf16. "
            "Use training.precision=fp16 or auto."
        )
    if precision == "fp16" and device == "cpu":
        raise LlamaLoraError("training.precision=fp16 is not supported on CPU. Use fp32 or bf16.")

    # Frozen weights are stored in the compute dtype (half the memory); the adapter stays fp32 (PEFT's
    # autocast_adapter_dtype) so its optimizer updates do not underflow.
    model_dtype = _DTYPES[model.dtype] if model.dtype != "auto" else _PRECISION_DTYPE[precision]

    attn = model.attn_implementation
    fa_ok = device == "cuda" and caps.flash_attn and caps.cuda_capability >= (8, 0) and model_dtype != torch.float32
    if attn == "auto":
        attn = "flash_attention_2" if fa_ok else "sdpa"
    elif attn == "flash_attention_2" and not fa_ok:
        raise LlamaLoraError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU with compute capability >= 8.0, "
            "the flash-attn package (pip install 'llama-lora[flash]') and a bf16/fp16 model. "
            "Use model.attn_implementation=auto to fall back to SDPA."
        )
    on_cuda = device == "cuda"
    reason = (
        f"device={device} ({'CUDA x%d, cc %d.%d' % (caps.cuda_device_count, *caps.cuda_capability) if on_cuda else 'no CUDA' if device == 'cpu' else 'Apple MPS'}), "
        f"precision={precision} (requested {training.precision}), weights={str(model_dtype).removeprefix('torch.')}, "
        f"attention={attn} (flash-attn {'installed' if caps.flash_attn else 'not installed'})"
    )
    return Runtime(
        device=device,
        precision=precision,
        model_dtype=model_dtype,
        attn_implementation=attn,
        grad_scaler=precision == "fp16",
        pin_memory=on_cuda,
        fused_adamw=on_cuda,
        tf32=on_cuda and caps.cuda_capability >= (8, 0),
        reason=reason,
    )


def resolve_model_path(name_or_path: str) -> str:
    """'embedded' -> the cached tiny Llama (built on first use); anything else is passed through."""
    if name_or_path == EMBEDDED:
        from llama_lora.embedded import ensure_base_model

        return str(ensure_base_model())
    return name_or_path


def hub_error(e: Exception, kind: str, name: str) -> LlamaLoraError:
    """Turn a from_pretrained/load_dataset failure into advice the user can follow."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()
    if looks_local or Path(name).expanduser().exists():
        return LlamaLoraError(f"Could not load the {kind} from the local path '{name}': {text}")
    gated = any(w in text.lower() for w in ("gated", "401", "403", "unauthorized", "restricted"))
    offline = any(w in text.lower() for w in ("connect", "resolve", "offline", "network", "timed out", "couldn't find"))
    hint = (
        "It is gated: accept its licence on huggingface.co, then run `huggingface-cli login` or set HF_TOKEN."
        if gated
        else "The hub could not be reached (no network?) or the id is wrong; check the id, your network, "
        "and HF_TOKEN for gated models."
        if offline
        else "Check the id or path."
    )
    return LlamaLoraError(
        f"Could not load the {kind} '{name}' ({text}). {hint} To try llama-lora offline, run "
        "`llama-lora train experiment=quickstart` (embedded tiny model and data)."
    )


def load_tokenizer(name_or_path: str, model: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:
        raise hub_error(e, "tokenizer", name_or_path) from e
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from eos when its vocabulary has a spare one.

    Llama 3 ships no pad token but reserves <|finetune_right_pad_id|>; reusing eos as pad is a classic
    bug source (the model never learns to stop when eos positions get masked as padding).
    """
    if tok.pad_token is not None:
        return
    vocab = tok.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]", tok.unk_token):
        if candidate and candidate in vocab and candidate != tok.eos_token:
            tok.pad_token = candidate
            return
    log.warning("Tokenizer has no pad token and no spare one; using eos as pad (labels are masked explicitly).")
    tok.pad_token = tok.eos_token


def load_model(name_or_path: str, model: ModelConfig, runtime: Runtime, training: bool = True) -> PreTrainedModel:
    try:
        m = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=model.revision,
            dtype=runtime.model_dtype,
            attn_implementation=runtime.attn_implementation,
            trust_remote_code=model.trust_remote_code,
        )
    except Exception as e:
        raise hub_error(e, "model", name_or_path) from e
    m.to(runtime.device)
    if training:
        # The KV cache is useless in training, and transformers only derives the per-example
        # (packed) attention mask from position_ids when no cache is passed.
        m.config.use_cache = False
        if model.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # With a frozen embedding nothing upstream requires grad; checkpointed blocks need it.
            m.enable_input_require_grads()
    return m
