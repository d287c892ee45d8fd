"""Base model and tokenizer at the right device, dtype and attention kernel. Knows nothing of adapters."""

from __future__ import annotations

import ctypes
import importlib.util
import json
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
    malloc_override: str = ""  # LLAMA_LORA_MALLOC=system|keep|return: how CPU malloc treats freed memory
    # bitsandbytes importable (model.quantization); None: not probed (choose_runtime probes it on demand)
    bitsandbytes: bool | None = None


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
        glibc=has_glibc(),
        malloc_override=malloc_override(),
    )


def has_glibc() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def malloc_override() -> str:
    """LLAMA_LORA_MALLOC, checked: "" when unset."""
    value = os.environ.get("LLAMA_LORA_MALLOC", "").strip()
    if value not in ("", "system", "keep", "return"):
        raise LlamaLoraError(f"LLAMA_LORA_MALLOC={value!r} is not a malloc mode. Use system (glibc's own policy), "
                             "keep (freed memory stays in the heap: faster, more memory), return (large freed "
                             "blocks go back to the OS), or unset it for the run's default.")
    return value


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
    # CPU + glibc: "keep" (the heap keeps freed memory for reuse) or "return" (large freed blocks go back
    # to the OS at once); "system": glibc's own policy (see apply_process_settings).
    malloc: str = "system"
    reason: str = field(default="", compare=False)
    quantization: str = "none"  # model.quantization: none | nf4 | fp4 | int8 (bitsandbytes)
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
    check_quantization(model.quantization, device, caps)

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
    malloc = (caps.malloc_override or cpu_malloc_mode(model, precision)) if device == "cpu" and caps.glibc else "system"

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
                                    ("malloc keeps freed memory", malloc == "keep"),
                                    ("malloc returns freed memory", malloc == "return")) if on]
    quant = "" if model.quantization == "none" else f" ({describe_quantization(model.quantization, precision)})"
    reason = (
        f"device={device} ({where}), precision={precision} (requested {training.precision}), "
        f"weights={str(model_dtype).removeprefix('torch.')}{quant}, attention={attn} "
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
        malloc=malloc,
        quantization=model.quantization,
        reason=reason,
    )


# ----------------------------------------------------------------------------------------------------
# Quantized bases (model.quantization): bitsandbytes through transformers' BitsAndBytesConfig.

QUANT_EXTRA = "pip install 'llama-lora[quant]'"


# Opt-in for kernels that dependencies fetch from the Hugging Face Hub and run (off by default).
HUB_KERNELS_ENV = "LLAMA_LORA_HUB_KERNELS"
# What bitsandbytes logs when it is kept to its built-in CPU kernel: nothing a user can act on.
_BNB_KERNEL_NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def hub_kernels_allowed() -> bool:
    return os.environ.get(HUB_KERNELS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_MISSING = object()


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNEL_NOTICE)


def import_bitsandbytes():
    """Import bitsandbytes with its built-in kernels only, quietly; None where it is not installed.

    On a CPU with AVX512-BF16, bitsandbytes' import calls `kernels.get_kernel(...)`, which downloads
    compiled code from the Hugging Face Hub and runs it (offline it warns about a skipped trust check).
    llama-lora runs no code it did not install: during that one import the `kernels` package is made
    unimportable (Python's documented `sys.modules[name] = None`), so bitsandbytes takes its own C
    kernel, and its notice about the missing Hub kernel is dropped. LLAMA_LORA_HUB_KERNELS=1 lets it
    fetch. PEFT imports bitsandbytes for any adapter when it is installed, so every model load calls
    this first; the choice holds for the whole process (bitsandbytes picks its kernel once).
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())
    if hub_kernels_allowed():
        return importlib.import_module("bitsandbytes")
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        if saved is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved


def bitsandbytes_available() -> bool:
    """Whether `import bitsandbytes` works (imported for real: a broken install counts as missing)."""
    try:
        return import_bitsandbytes() is not None
    except Exception:
        return False


def check_quantization(quantization: str, device: str, caps: Capabilities) -> None:
    """A quantized base where bitsandbytes cannot run is an error saying what to do instead."""
    if quantization == "none":
        return
    if device == "mps":
        raise LlamaLoraError(
            f"model.quantization={quantization} needs bitsandbytes, which has no Apple MPS backend. Train on MPS "
            "with model.quantization=none (and model.dtype=bfloat16 to halve the base's memory), or set "
            "training.device=cpu to train the quantized base on the CPU.")
    available = caps.bitsandbytes if caps.bitsandbytes is not None else bitsandbytes_available()
    if not available:
        raise LlamaLoraError(
            f"model.quantization={quantization} needs the bitsandbytes package, which is not installed (or does "
            f"not import). Install it with {QUANT_EXTRA}, or use model.quantization=none.")


def check_sharding(quantization: str, sharded: bool) -> None:
    """FSDP/DeepSpeed with a bitsandbytes base is refused before anything is loaded or written.

    Sharding a 4-bit base needs bnb_4bit_quant_storage equal to the compute dtype and every shard's quant
    state gathered with it; peers' users hit a silent loss of 0 or NaN where that goes wrong
    (accelerate#3983, bitsandbytes#1945). It is not built or tested here, so it is refused, never half-run.
    """
    if quantization != "none" and sharded:
        raise LlamaLoraError(
            f"model.quantization={quantization} with FSDP or DeepSpeed is not supported: sharding a bitsandbytes "
            "base needs its quant storage dtype matched to the compute dtype and its quantization statistics "
            "sharded with it, which llama-lora does not do (a mismatch trains silently to loss 0 or NaN). Use "
            "DDP (configs/accelerate/ddp*.yaml, each process holds the whole 4-bit base), or "
            "model.quantization=none with FSDP.")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype bitsandbytes dequantizes 4-bit blocks to for each matmul: the run's precision."""
    return _PRECISION_DTYPE[precision]


def describe_quantization(quantization: str, precision: str) -> str:
    if quantization == "int8":
        return "int8 bitsandbytes LLM.int8(), lm_head and embeddings not quantized"
    return (f"{quantization} bitsandbytes 4-bit, double quantization, compute "
            f"{str(compute_dtype(precision)).removeprefix('torch.')}, lm_head and embeddings not quantized")


def bnb_config(quantization: str, precision: str):
    """transformers' BitsAndBytesConfig for model.quantization (QLoRA's recipe for 4-bit: Dettmers et al.
    2023, sec. 3, NF4 with double quantization of the block statistics)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # quant_storage stays bitsandbytes' packed uint8: only FSDP needs it equal to the compute dtype, and
    # FSDP with a quantized base is refused (check_sharding).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(precision), bnb_4bit_quant_storage=torch.uint8)


QUANT_CONFIG_FILE = "quantization_config.json"

_QUANT_CARD = """
## Quantized base: load it the way it was trained

This adapter was trained on its base model quantized by bitsandbytes ({what}). It reproduces the trained model
only on the same quantization: `{file}` beside this card is the exact `BitsAndBytesConfig`. With plain
transformers and PEFT:

```python
import json
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

quant = BitsAndBytesConfig.from_dict(json.load(open("adapter/{file}")))
base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=quant, device_map={{"": "cpu"}})
for module in base.modules():  # CPU only: keep bitsandbytes' eval on the precision training used
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, "adapter")
```

(`device_map={{"": "cuda"}}` on a GPU, where the loop does nothing.) On a CPU with AVX512-BF16, bitsandbytes
otherwise repacks each 4-bit weight for a bf16 kernel on the first eval forward, which moves the outputs by
about a percent of the adapter's effect. On a base quantized otherwise (another quant type, no double
quantization) the adapter is off by much of its effect; `llama-lora merge` writes a full-precision model.
"""


def record_quantization(adapter_dir: Path, runtime: Runtime, base: str) -> None:
    """Write the quantization an adapter was trained on into its folder: the BitsAndBytesConfig as JSON and
    a section of its model card (README.md, PEFT's) with the plain-PEFT load that reproduces it."""
    config = bnb_config(runtime.quantization, runtime.precision).to_dict()
    (adapter_dir / QUANT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    card = adapter_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    card.write_text(text + _QUANT_CARD.format(what=describe_quantization(runtime.quantization, runtime.precision),
                                              file=QUANT_CONFIG_FILE, base=base))


def prepare_kbit(model: PreTrainedModel, runtime: Runtime) -> None:
    """k-bit training preparation, as PEFT's prepare_model_for_kbit_training minus one part.

    Kept: every base parameter frozen, norm weights in fp32 when the base is in half precision (their
    output feeds every quantized matmul), and input gradients for gradient checkpointing (load_model
    does that for any base). Left out: PEFT's cast of *every* non-quantized parameter to fp32, which
    doubles the embedding and an untied lm_head in bf16 runs (0.5 GiB more on Llama-3.2-1B's 128k x 2048
    vocabulary) for no gain under autocast. In an fp32 run the two preparations are the same thing
    (tests/unit/test_quant.py compares them).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if runtime.model_dtype != torch.float32:
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.data = p.data.float()


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' CPU 4-bit layers on the path training uses, in eval too.

    On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks a 4-bit weight on its first eval-mode forward
    for a bf16 kernel: eval and inference would then compute in bf16 what training computed in the run's
    precision, and the repacking is lossy (its statistics are rounded: the dequantized weight moves by up
    to 0.4% of its largest value, measured on the tiny model), so merge could no longer recover the weights
    that were trained. Turning it off keeps eval = training numerics; it only costs CPU inference speed.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def dequantize_model(model: PreTrainedModel, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes Linear of `model` by a plain nn.Linear holding its dequantized weight
    in `dtype`; returns how many were replaced.

    Written here because transformers' own `model.dequantize()` (5.x) returned wrong weights for 4-bit
    layers on CPU once they had run an eval-mode forward (logits off by the whole logit scale: it misses
    bitsandbytes' CPU repacking, undone below); the per-weight dequantization is PEFT's
    `dequantize_bnb_weight` (bitsandbytes' dequantize_4bit / int8_vectorwise_dequant).
    """
    from peft.utils.integrations import dequantize_bnb_weight

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            kind = type(child.weight).__name__ if isinstance(getattr(child, "weight", None), torch.Tensor) else ""
            if kind not in ("Params4bit", "Int8Params"):
                continue
            qs = getattr(child.weight, "quant_state", None)
            if getattr(qs, "packing_format_for_cpu", False):
                # A model not loaded by load_model (which keeps the layout: _keep_4bit_layout) may have been
                # repacked for bitsandbytes' CPU kernel; dequantize_4bit reads the original layout, so undo
                # the repacking first, as bitsandbytes does before saving or moving the weight.
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                child.weight.data, child.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    child.weight.data, qs)
            weight = dequantize_bnb_weight(child.weight, state=getattr(child, "state", None)).to(dtype)
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias.to(dtype))
            setattr(module, child_name, plain)
            count += 1
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return count


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# "return": blocks from this size up are mmapped and unmapped when freed (glibc's initial threshold, made fixed).
_RETURN_FROM = 128 << 10


def cpu_malloc_mode(model: ModelConfig, precision: str) -> str:
    """How glibc malloc treats freed CPU memory for a run: "keep" for a plain fp32 run, else "return".

    A heap that keeps freed memory (no mmap, no trim) makes an fp32 LoRA step faster but fragments as layers
    free their activations in the backward. On Llama-3.2-1B's shape (16 layers, 4 x 512 tokens), LoRA fp32:
    18.6 GiB kept vs 15.8 returned for a 22% faster step; with the chunked loss (the default at that
    vocabulary) 16.1 vs 13.9 GiB for 6%. In bf16 no speed-up showed (single steps in separate invocations
    disagreed) and its fragmentation varied from 3% to 26% of the tensors, more than a plan can absorb.
    With gradient checkpointing: 12.5 vs 9.5 GiB for 5%. A quantized base is worse under both "keep" and
    glibc's own policy: bitsandbytes frees a dequantized fp32 weight per layer per pass, and glibc's mmap
    threshold rises to 32 MiB after the first large free, after which those weights fragment the heap
    (+3.9 GiB at 16 layers). So only a plain fp32 run (no quantized base, no checkpointing) keeps
    (benchmarks/README.md, "Memory"); the planner counts each mode's heap."""
    plain = precision == "fp32" and model.quantization == "none" and not model.gradient_checkpointing
    return "keep" if plain else "return"


def apply_process_settings(runtime: Runtime) -> None:
    """Process-wide settings that go with a runtime: TF32 tensor cores on CUDA; on CPU, how glibc malloc
    treats freed memory.

    PyTorch's CPU allocator has no cache of its own: a large tensor (logits, activations, their gradients)
    is malloc'ed and freed as it is. "keep" tells glibc never to mmap and never to trim, so those pages stay
    in the heap for the next micro-batch: faster steps for a little more peak RSS (benchmarks/README.md,
    "Memory"). "return" fixes glibc's mmap threshold at 128 KiB: left to itself glibc raises it to the size
    of the largest block freed (up to 32 MiB), after which a quantized base's per-layer dequantized weights
    come from the heap and leave it fragmented. LLAMA_LORA_MALLOC=system|keep|return overrides the choice
    (choose_runtime reads it through Capabilities, so the planner sees the same mode).
    """
    if runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mode = runtime.malloc
    if mode not in ("keep", "return"):
        return
    if mode == "keep":
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))
    else:
        settings = ((_M_MMAP_THRESHOLD, _RETURN_FROM), (_M_TRIM_THRESHOLD, _RETURN_FROM))
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("mallopt unavailable: glibc's own policy for freed CPU memory")


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
    """The base at runtime's device and dtype; quantized by bitsandbytes when runtime.quantization says so
    (every command loads a base through here, so train, eval, baseline, infer and merge quantize alike)."""
    quantized = runtime.quantization != "none"
    bitsandbytes_available()  # before transformers or PEFT import it: its built-in kernels, quietly
    extra = {}
    if quantized:
        # bitsandbytes quantizes while loading, onto the device it computes on: this process's GPU under
        # DDP (accelerate has set it), else the runtime's device. A quantized model cannot be moved later.
        where = f"cuda:{torch.cuda.current_device()}" if runtime.device == "cuda" else runtime.device
        extra = {"quantization_config": bnb_config(runtime.quantization, runtime.precision), "device_map": {"": where}}
    try:
        m = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=model.revision,
            dtype=runtime.model_dtype,
            attn_implementation=runtime.attn_implementation,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin-only model is refused with an error
            **extra,
        )
    except Exception as e:
        raise hub_error(e, "model", name_or_path) from e
    if not quantized:
        m.to(runtime.device)
    else:
        _keep_4bit_layout(m)
        if training:
            prepare_kbit(m, runtime)
    if training:
        # The KV cache is useless in training, and transformers only derives the per-example
        # (packed) attention mask from position_ids when no cache is passed.
        m.config.use_cache = False
        if model.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # With a frozen embedding nothing upstream requires grad; checkpointed blocks need it.
            m.enable_input_require_grads()
    return m
