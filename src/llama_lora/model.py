"""Base model and tokenizer at the right device, dtype and attention kernel. Knows nothing of adapters."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llama_lora.config.schema import EMBEDDED, ModelConfig, TrainingConfig
from llama_lora.errors import LlamaLoraError

if TYPE_CHECKING:
    from llama_lora.lean import LeanPolicy

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers; a plain value so the device matrix can be tested with fakes."""

    cuda: bool = False
    cuda_device_count: int = 0
    cuda_bf16: bool = False  # native bf16 (Ampere, cc >= 8.0, or ROCm); emulated bf16 does not count
    cuda_capability: tuple[int, int] = (0, 0)
    mps: bool = False
    flash_attn: bool = False
    world_size: int = 1  # processes started by torchrun / accelerate launch
    glibc: bool = False  # Linux with glibc's malloc (mallopt available)


def probe_capabilities() -> Capabilities:
    cuda = torch.cuda.is_available()
    try:  # torch >= 2.3 reports emulated bf16 (pre-Ampere GPUs) as supported unless told not to: far too slow
        bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        bf16 = cuda and torch.cuda.is_bf16_supported()
    return Capabilities(
        cuda=cuda,
        cuda_device_count=torch.cuda.device_count() if cuda else 0,
        cuda_bf16=bf16,
        cuda_capability=torch.cuda.get_device_capability() if cuda else (0, 0),
        mps=bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        glibc=sys.platform == "linux" and platform.libc_ver()[0] == "glibc",
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
    keep_freed_memory: bool = False  # CPU + glibc: see apply_process_settings
    reason: str = field(default="", compare=False)
    # The lean LoRA/DoRA step, decided once for the run (llama_lora.lean.decide; needs the adapter config
    # and whether the model is sharded, so train.py sets it with dataclasses.replace); None: not decided.
    lean: "LeanPolicy | None" = None


def choose_runtime(training: TrainingConfig, model: ModelConfig, caps: Capabilities) -> Runtime:
    """Pick device -> precision -> weights dtype -> attention -> CUDA extras (a pure function of its inputs).

    Policy: the fast, safe choice for the machine unless the config asks otherwise; an explicit request
    the machine cannot honour is an error that says what to use instead, never a silent fallback.
    """
    device = training.device
    if device == "auto":
        device = "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if device == "cuda" and not caps.cuda:
        raise LlamaLoraError("training.device=cuda but no CUDA GPU is visible. Use training.device=auto or cpu.")
    if device == "mps" and not caps.mps:
        raise LlamaLoraError("training.device=mps but MPS is not available. Use training.device=auto or cpu.")
    on_cuda = device == "cuda"

    precision = training.precision
    if precision == "auto":
        if on_cuda:
            # bf16 has fp32's range (no loss scaling); pre-Ampere GPUs only have fast fp16.
            precision = "bf16" if caps.cuda_bf16 else "fp16"
        else:
            # CPU bf16 matmuls are slow without AMX and MPS half-precision autocast is patchy: fp32 unless asked.
            precision = "fp32"
    if precision == "bf16" and on_cuda and not caps.cuda_bf16:
        raise LlamaLoraError(
            f"training.precision=bf16 but this GPU (compute capability {'%d.%d' % caps.cuda_capability}) has no "
            "native bf16 (it needs 8.0+, Ampere or newer). Use training.precision=fp16 or auto."
        )
    if precision == "fp16" and device == "cpu":
        raise LlamaLoraError("training.precision=fp16 is not supported on CPU. Use training.precision=fp32 or bf16.")
    if model.dtype == "float16" and device == "cpu":
        raise LlamaLoraError("model.dtype=float16 is not supported on CPU (half-precision CPU kernels are missing "
                             "or slow). Use model.dtype=auto, float32 or bfloat16.")

    # Frozen weights are stored in the compute dtype (half the memory); the adapter stays fp32 (PEFT's
    # autocast_adapter_dtype) so its optimizer updates do not underflow.
    model_dtype = _DTYPES[model.dtype] if model.dtype != "auto" else _PRECISION_DTYPE[precision]

    attn = model.attn_implementation
    # FlashAttention 2 kernels exist for Ampere and newer (cc >= 8.0) and half-precision tensors only.
    fa_ok = on_cuda and caps.flash_attn and caps.cuda_capability >= (8, 0) and model_dtype != torch.float32
    if attn == "auto":
        attn = "flash_attention_2" if fa_ok else "sdpa"
    elif attn == "flash_attention_2" and not fa_ok:
        raise LlamaLoraError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU with compute capability >= 8.0, "
            "the flash-attn package (pip install 'llama-lora[flash]') and a bf16/fp16 model. "
            "Use model.attn_implementation=auto to fall back to SDPA."
        )

    # CUDA-only speed-ups: fused AdamW kernels, pinned host memory for async copies, and TF32 tensor
    # cores for the fp32 matmuls that remain (Ampere and newer only).
    fused_adamw, pin_memory = on_cuda, on_cuda
    tf32 = on_cuda and caps.cuda_capability >= (8, 0)
    grad_scaler = precision == "fp16"
    keep_freed_memory = device == "cpu" and caps.glibc

    if on_cuda:
        where = f"CUDA x{caps.cuda_device_count}, cc {'%d.%d' % caps.cuda_capability}"
        if caps.world_size > 1:
            where += f", {caps.world_size} processes"
        elif caps.cuda_device_count > 1:
            where += (f", 1 process: launch with torchrun --nproc_per_node {caps.cuda_device_count} "
                      "or accelerate launch to use them all")
    else:
        where = "Apple MPS" if device == "mps" else "CPU"
        if caps.cuda:
            where += ", CUDA present but not chosen"
        elif device == "cpu":
            where += ", no CUDA" + ("" if caps.mps else " or MPS")
        if caps.world_size > 1:
            where += f", {caps.world_size} processes"
    extras = [name for name, on in (("fp16 loss scaling", grad_scaler), ("fused AdamW", fused_adamw),
                                    ("TF32", tf32), ("pinned memory", pin_memory),
                                    ("malloc keeps freed memory", keep_freed_memory)) if on]
    reason = (
        f"device={device} ({where}), precision={precision} (requested {training.precision}), "
        f"weights={str(model_dtype).removeprefix('torch.')}, attention={attn} "
        f"(flash-attn {'installed' if caps.flash_attn else 'not installed'}), "
        f"extras: {', '.join(extras) or 'none'}"
    )
    return Runtime(
        device=device,
        precision=precision,
        model_dtype=model_dtype,
        attn_implementation=attn,
        grad_scaler=grad_scaler,
        pin_memory=pin_memory,
        fused_adamw=fused_adamw,
        tf32=tf32,
        keep_freed_memory=keep_freed_memory,
        reason=reason,
    )


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def apply_process_settings(runtime: Runtime) -> None:
    """Process-wide settings that go with a runtime: TF32 tensor cores on CUDA; on CPU, glibc malloc that
    keeps freed memory for reuse.

    PyTorch's CPU allocator has no cache of its own: every large tensor (logits, activations, their
    gradients) is a fresh mmap whose pages the kernel zero-fills on first touch, and the freed block goes
    straight back to the OS. Telling glibc never to mmap and never to trim keeps those pages in the heap
    for the next micro-batch: faster steps for a little more peak RSS (benchmarks/README.md, range S18).
    LLAMA_LORA_MALLOC=system turns it off.
    """
    if runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if runtime.keep_freed_memory and os.environ.get("LLAMA_LORA_MALLOC", "") != "system":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
        except (OSError, AttributeError):
            ok = False
        if not ok:
            log.debug("mallopt unavailable: CPU memory is returned to the OS after each step")


def resolve_model_path(name_or_path: str) -> str:
    """'embedded' -> the cached tiny Llama (built on first use); anything else is passed through."""
    if name_or_path == EMBEDDED:
        from llama_lora.embedded import ensure_base_model

        return str(ensure_base_model())
    path = Path(name_or_path).expanduser()
    # Checked here, before any loading, because transformers reports a missing local path as a bad
    # hub id ("Repo id must be in the form ...") and an empty folder as a tokenizer problem.
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not path.is_dir():
            raise LlamaLoraError(
                f"model.name_or_path '{name_or_path}' does not exist or is not a directory. Give a local "
                "model directory in transformers format, a hub id such as meta-llama/Llama-3.2-1B-Instruct, "
                "or 'embedded'."
            )
        if not (path / "config.json").is_file():
            raise LlamaLoraError(
                f"model.name_or_path '{name_or_path}' is not a model directory in transformers format: it has "
                "no config.json. Point it at the folder holding config.json, the tokenizer files and "
                "*.safetensors (what save_pretrained writes)."
            )
        return str(path)
    return name_or_path


def hub_error(e: Exception, kind: str, name: str) -> LlamaLoraError:
    """Turn a from_pretrained/load_dataset failure into advice the user can follow."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()
    if looks_local or Path(name).expanduser().exists():
        corrupt = any(w in text.lower() for w in ("safetensorerror", "deserializ", "header", "truncat"))
        hint = (
            "Its weights are not in safetensors format, and llama-lora never unpickles weights (a .bin "
            "file can run code when loaded): convert it once with from_pretrained + save_pretrained."
            if "no file named model.safetensors" in text.lower() else
            "A weights file is corrupted or incomplete (an interrupted download or copy?): save or copy it again."
            if corrupt else "Check that the folder holds a complete model written by save_pretrained."
        )
        return LlamaLoraError(f"Could not load the {kind} from the local path '{name}' ({text}). {hint}")
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
            use_safetensors=True,  # never unpickle weights: a .bin-only model is refused with an error
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
