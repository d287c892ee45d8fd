"""What the lean step runs for a configuration, decided once: `decide()` -> LeanPolicy.

Training, the memory planner and the logs read this one decision (`model.Runtime.lean`); nothing else
re-derives it. Each flag is on only where it takes effect, so `describe()` says what really runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_lora.errors import LlamaLoraError
from llama_lora.lean import native

KERNEL_MAX_RANK = 64  # native.py's kernel takes widths that are multiples of 16, up to 64


@dataclass(frozen=True)
class LeanPolicy:
    """The lean step's configuration for one run, with why each part is on or off.

    lean:   LeanLinear layers (the lean step) instead of PEFT's forward
    merged: the merged-weight step (W + s B A once per optimizer step): lean, fp32, no dropout
    kernel: the merged step's backward rank-r products in native.py's CPU kernel: merged, CPU, r a
            multiple of 16 and <= 64, and the kernel builds here
    """

    lean: bool
    merged: bool = False
    kernel: bool = False
    method: str = field(default="lora", compare=False)
    r: int = field(default=0, compare=False)
    lean_reason: str = field(default="", compare=False)
    merged_reason: str = field(default="", compare=False)
    kernel_reason: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kernel and not self.merged or self.merged and not self.lean:
            raise ValueError(f"inconsistent LeanPolicy: {self}")

    def describe(self) -> str:
        """The one log line saying what really runs."""
        method = "DoRA" if self.method == "dora" else "LoRA"
        if not self.lean:
            return f"PEFT's own {method} forward" + (f" ({self.lean_reason})" if self.lean_reason else "")
        text = f"lean {method} step"
        if not self.merged:
            return text + (f", low-rank, no merged weights ({self.merged_reason})" if self.merged_reason
                           else ", low-rank")
        text += ", merged fp32 weights"
        if self.kernel:
            text += ", rank-r products by llama-lora's CPU kernel"
            if 3 * self.r > KERNEL_MAX_RANK:  # the A gradient of q/k/v is 3r wide, of gate/up 2r
                text += f" (BLAS for an input group's A gradient wider than {KERNEL_MAX_RANK} columns)"
            return text
        return text + ", rank-r products by BLAS" + (f" ({self.kernel_reason})" if self.kernel_reason else "")


def decide(peft_cfg, device: str, precision: str, sharded: bool = False, quantization: str = "none") -> LeanPolicy:
    """The lean step for `peft_cfg` (config.schema.PeftConfig) on `device` ('cpu', 'cuda', 'mps') at
    `precision` ('fp32', 'bf16', 'fp16': the compute precision, Runtime.precision); `sharded`: FSDP or
    DeepSpeed, whose parameter sharding the lean step does not handle; `quantization`: model.quantization.

    peft.lean=auto: the lean step on CPU, and for DoRA everywhere; PEFT's forward for LoRA on a GPU, where
    a step is bound by kernel launches and Python and the lean step's Python backward measured slower
    (benchmarks/README.md, the CPU and H100 tables).
    peft.lean_merged=auto: on CPU, where a step is bound by memory traffic and the merged step removes three
    passes over activations per layer (benchmarks/README.md); on a GPU, where training runs in bf16 anyway, an
    fp32 run keeps the low-rank lean step (not measured there). It takes effect only in fp32 without
    dropout: rounded to bf16, W + s B A would lose the update s B A.
    peft.lean_kernel: the CPU kernel of native.py where it builds (auto) or must (true: an error names why
    it cannot, whatever else is decided, as for any explicit request the machine cannot honour).
    A quantized base (model.quantization nf4/fp4/int8): the lean step steps aside for PEFT's bitsandbytes
    layers. Its forward reads the base weight as a plain tensor (x W^T, W + s B A, DoRA's ||W|| rows),
    which a packed 4-bit or int8 weight is not; PEFT's Linear4bit/Linear8bitLt dequantize through
    bitsandbytes. peft.lean=true on such a base is an error.
    """
    device = "cuda" if device.startswith("cuda") else device
    if peft_cfg.lean_kernel is True and device == "cpu" and native.load() is None:
        raise LlamaLoraError(
            f"peft.lean_kernel=true, but llama-lora's CPU kernel cannot be built here ({native.why()}). "
            "It needs GCC with OpenMP on PATH (e.g. `apt install gcc`); or set peft.lean_kernel=auto "
            "(BLAS where it cannot be built) or false.")
    common = {"method": peft_cfg.method, "r": peft_cfg.r}

    # ---- the lean step
    if quantization != "none":
        if peft_cfg.lean is True:
            raise LlamaLoraError(
                f"peft.lean=true cannot run on a quantized base (model.quantization={quantization}): the lean step "
                "computes with the base weight as a plain tensor, and bitsandbytes stores it packed. Use "
                "peft.lean=auto (PEFT's bitsandbytes LoRA/DoRA layers train it) or model.quantization=none.")
        return LeanPolicy(False, lean_reason=f"model.quantization={quantization}: PEFT's bitsandbytes layers, the "
                                             "lean step needs a plain base weight", **common)
    if sharded:
        return LeanPolicy(False, lean_reason="FSDP/DeepSpeed shard the parameters, which the lean step does not "
                                             "handle", **common)
    if peft_cfg.lean == "auto":
        lean = device == "cpu" or peft_cfg.method == "dora"
        lean_reason = ("peft.lean=auto: on CPU" if device == "cpu" else "peft.lean=auto: DoRA" if lean
                       else f"peft.lean=auto: LoRA on {device}")
    else:
        lean = bool(peft_cfg.lean)
        lean_reason = f"peft.lean={str(lean).lower()}"
    if not lean:
        return LeanPolicy(False, lean_reason=lean_reason, **common)

    # ---- the merged step
    if peft_cfg.lean_merged is False:
        merged_reason = "peft.lean_merged=false"
    elif peft_cfg.lean_merged == "auto" and device != "cpu":
        merged_reason = f"peft.lean_merged=auto: on CPU only, this is {device}"
    elif precision != "fp32":
        merged_reason = f"{precision}: W + s B A would round the update away"
    elif peft_cfg.dropout > 0:
        merged_reason = f"dropout {peft_cfg.dropout:g} > 0"
    else:
        merged_reason = ""
    if merged_reason:
        return LeanPolicy(True, lean_reason=lean_reason, merged_reason=merged_reason, **common)

    # ---- the rank-r kernel
    r = peft_cfg.r
    if peft_cfg.lean_kernel is False:
        kernel_reason = "peft.lean_kernel=false"
    elif device != "cpu":
        kernel_reason = f"the kernel is CPU-only, this is {device}"
    elif r % 16:
        kernel_reason = f"r={r} is not a multiple of 16"
    elif r > KERNEL_MAX_RANK:
        kernel_reason = f"r={r} is above {KERNEL_MAX_RANK}"
    elif native.load() is None:
        kernel_reason = f"the kernel cannot be built here: {native.why()}"
    else:
        kernel_reason = ""
    return LeanPolicy(True, True, not kernel_reason, lean_reason=lean_reason, kernel_reason=kernel_reason, **common)
