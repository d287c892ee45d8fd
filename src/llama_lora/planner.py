"""Predict a training run's peak memory from its configuration alone (no weights are loaded).

Peak memory of adapter training is reached at the start of backward: everything that stays resident
(frozen weights, adapter, its gradients and optimizer state) plus every tensor autograd saved during
the forward pass plus the vocabulary-sized loss buffers. The activation term is counted tensor by tensor
from what PyTorch's autograd keeps for a Llama-style decoder layer (RMSNorm -> q/k/v -> RoPE -> SDPA ->
o -> RMSNorm -> SwiGLU), so it follows batch size, sequence length, packing, dropout, gradient
checkpointing and which modules carry an adapter. The parameter counts come from the model built on the
meta device (``init_empty_weights``), so any architecture transformers knows is counted exactly.

``plan_memory`` is used by ``validate`` (shows the plan) and by ``train`` with
``training.auto_batch_size=true`` (largest micro-batch that fits, see ``largest_micro_batch``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig

from llama_lora.config.schema import Config

from llama_lora.loss import AUTO_MIN_VOCAB
from llama_lora.plan import RunPlan, plan_for_device

if TYPE_CHECKING:
    from llama_lora.lean import LeanPolicy

GiB = 2**30
# Framework baseline that is not tensors: the CUDA context + allocator reserve, or on CPU the Python
# interpreter with torch/transformers/peft loaded (measured RSS after import on Linux x86-64).
_RUNTIME_OVERHEAD = {"cuda": int(0.75 * GiB), "mps": int(0.5 * GiB), "cpu": int(0.55 * GiB)}
# Caching allocators and fragmentation keep some freed blocks: a share of the tensor total. On CPU that
# is glibc's heap when it keeps freed memory (malloc "keep", a plain fp32 run) or follows its own policy
# ("system"): LoRA fp32 on Llama-3.2-1B's shape held 14-22% more than its tensors at 2 and 16 layers, with
# and without the chunked loss (benchmarks/README.md, "Memory").
_FRAGMENTATION = {"cuda": 0.08, "mps": 0.10, "cpu": 0.17}
# A CPU run whose heap returns every large freed block (malloc "return": every run but a plain fp32 one)
# has no fragmentation share; what RSS held beyond the planned tensors was 0.15-0.33 GiB on the issue-15
# benchmark rows at 4 and 16 layers.
_CPU_RETURNING_OVERHEAD = int(0.25 * GiB)


@dataclass
class MemoryPlan:
    """A predicted peak, its parts (bytes), and whether it fits the device or budget."""

    total_bytes: int
    breakdown: dict[str, int]
    available_bytes: int | None
    fits: bool
    device: str
    micro_batch_size: int
    tokens_per_micro_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        """The peak without the framework's fixed runtime overhead (what a tensor allocator sees)."""
        return self.total_bytes - self.breakdown.get("overhead", 0)

    def report(self) -> str:
        lines = [
            f"Memory plan ({self.device}, micro-batch {self.micro_batch_size}, "
            f"up to {self.tokens_per_micro_batch} tokens per forward pass):"
        ]
        for k, v in self.breakdown.items():
            lines.append(f"  {k:<14}{_fmt(v):>12}")
        lines.append(f"  {'peak total':<14}{_fmt(self.total_bytes):>12}")
        if self.available_bytes is None:
            lines.append("  available: unknown (no such device here; set training.memory_budget_gb)")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  available     {_fmt(self.available_bytes):>12}  -> {verdict} "
                         f"({100 * self.total_bytes / max(self.available_bytes, 1):.0f}%)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------
# Parameter counts from the meta-device model.


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int


@lru_cache(maxsize=16)
def _model_shapes(config_cls: type, config_json: str) -> tuple[int, tuple[_Linear, ...]]:
    """(total parameters, every nn.Linear) of the model, built on the meta device (no memory, no weights)."""
    import json

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = config_cls.from_dict(json.loads(config_json))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # init_empty_weights skips tying: without this a tied head would count twice
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    linears = tuple(
        _Linear(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    return total, linears


# bitsandbytes' 4-bit layout (bitsandbytes.functional.quantize_4bit, as transformers calls it): 64 weights
# per block, one absmax per block; double quantization (QLoRA sec. 3) stores those absmax as uint8 in
# blocks of 256 with an fp32 absmax each, plus a 256-entry fp32 code; the 4-bit code has 16 fp32 entries.
_4BIT_BLOCK, _4BIT_BLOCK2 = 64, 256


def _frozen_weights(quantization: str, total_params: int, linears: tuple[_Linear, ...],
                    w_bytes: int, compute_bytes: int) -> tuple[int, int, int]:
    """(frozen weight bytes, quantization statistics bytes, dequantized-weight buffer bytes).

    Unquantized: every parameter at w_bytes. Quantized: every Linear but lm_head (transformers keeps the
    output head, tied or not, out of bitsandbytes) packed at 4 bits or 1 byte per weight; embeddings, norms
    and lm_head stay at w_bytes. Statistics: per 4-bit layer the block absmax (double-quantized) and codes;
    per int8 layer an fp32 scale per output row. The buffer: a 4-bit layer's forward and backward
    dequantize its weight to the compute dtype (one layer at a time: the largest), int8 its fp16 copy.
    """
    if quantization == "none":
        return total_params * w_bytes, 0, 0
    quantized = [m for m in linears if not m.name.endswith("lm_head")]
    n_q = sum(m.in_features * m.out_features for m in quantized)
    plain = (total_params - n_q) * w_bytes
    if quantization == "int8":
        stats = sum(m.out_features * 4 for m in quantized)
        return plain + n_q, stats, max((m.in_features * m.out_features for m in quantized), default=0) * 2
    stats = 0
    for m in quantized:
        blocks = -(-m.in_features * m.out_features // _4BIT_BLOCK)
        stats += blocks + -(-blocks // _4BIT_BLOCK2) * 4 + _4BIT_BLOCK2 * 4 + 16 * 4
    buffer = max((m.in_features * m.out_features for m in quantized), default=0) * compute_bytes
    return plain + n_q // 2, stats, buffer


def _targets(cfg: Config, linears: tuple[_Linear, ...]) -> list[_Linear]:
    """The Linear layers PEFT adapts: 'all-linear' is every Linear but the output head, else name match."""
    if cfg.peft.target_modules == "all-linear":
        return [m for m in linears if not m.name.endswith("lm_head")]
    names = set(cfg.peft.target_modules)
    return [m for m in linears if m.name.rsplit(".", 1)[-1] in names]


# ----------------------------------------------------------------------------------------------------
# Device memory.


def available_memory(cfg: Config, device: str) -> int | None:
    """The budget if set, else CUDA total memory, else physical RAM (CPU and MPS share system memory)."""
    if cfg.training.memory_budget_gb is not None:
        return int(cfg.training.memory_budget_gb * GiB)
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------
# The plan.


def _as_plan(cfg: Config, plan: RunPlan | str, lean: LeanPolicy | None) -> RunPlan:
    """The run's plan, or one for a device name (plan.plan_for_device: where the run is not)."""
    return plan_for_device(cfg, plan, lean) if isinstance(plan, str) else plan


def plan_memory(
    cfg: Config,
    model_config: PretrainedConfig,
    plan: RunPlan | str,
    micro_batch_size: int | None = None,
    *,
    tokens_per_micro_batch: int | None = None,
    rows_per_micro_batch: int | None = None,
    loss_tokens_per_micro_batch: int | None = None,
    lean: LeanPolicy | None = None,
) -> MemoryPlan:
    """Predicted peak memory of training `cfg` as `plan` runs it (the run's RunPlan; or a device name,
    'cpu', 'cuda' or 'mps', for a typical machine with it, then `lean` may replace its step policy).

    Without token counts the worst case is planned: every example at data.max_seq_length. train.py
    passes the real worst micro-batch of the tokenized data instead (its longest examples), and the
    benchmark the measured batch. `rows_per_micro_batch` is 1 with packing (one concatenated row).
    """
    plan = _as_plan(cfg, plan, lean)
    device, rt, lean = plan.device, plan.runtime, plan.lean
    micro = micro_batch_size or cfg.training.base_micro_batch_size
    seq = cfg.data.max_seq_length
    T = tokens_per_micro_batch if tokens_per_micro_batch is not None else micro * seq
    rows = rows_per_micro_batch if rows_per_micro_batch is not None else (1 if cfg.data.packing else micro)
    # Positions that go through lm_head (logits_to_keep): without data, assume all but the prompt's
    # first token; callers with data pass the response-token count.
    K = loss_tokens_per_micro_batch if loss_tokens_per_micro_batch is not None else T
    # bytes per element: frozen weights in their dtype, activations in the compute precision
    w_bytes, s, precision = rt.model_dtype.itemsize, 4 if rt.precision == "fp32" else 2, rt.precision

    mc = model_config
    total_params, linears = _model_shapes(type(mc), mc.to_json_string(use_diff=False))
    targets = _targets(cfg, linears)
    p = cfg.peft
    r = p.r
    dora = p.method == "dora"
    adapter = sum(r * (m.in_features + m.out_features) + (m.out_features if dora else 0) for m in targets)

    # Resident state: frozen weights in their dtype; adapter, gradients and AdamW moments in fp32
    # (PEFT keeps adapters fp32 under bf16/fp16 autocast so small updates do not underflow).
    weights, quant_stats, dequant_buffer = _frozen_weights(cfg.model.quantization, total_params, linears, w_bytes, s)
    adapter_b = adapter * 4
    grads = adapter * 4
    optimizer = adapter * 4 * 2

    # ---- activations saved for backward, per token per decoder layer (bytes)
    h = mc.hidden_size
    nh = mc.num_attention_heads
    hd = getattr(mc, "head_dim", None) or h // nh
    nkv = getattr(mc, "num_key_value_heads", None) or nh
    q, kv = nh * hd, nkv * hd
    inter = getattr(mc, "intermediate_size", 4 * h)
    layers = mc.num_hidden_layers
    vocab = mc.vocab_size
    drop = p.dropout > 0

    leaf = {m.name.rsplit(".", 1)[-1] for m in targets}
    merged = lean.merged
    # The merged step (fp32, no dropout) keeps W + s B A of every adapted layer, in fp32, between steps.
    merged_weights = sum(m.in_features * m.out_features for m in targets) * 4 if merged else 0
    # Inputs kept for the adapters' weight gradients, by the modules that read the same tensor. Without
    # dropout the shared input is kept once (autograd saves one storage). With dropout the lean step
    # keeps the input once plus a 1-byte mask per module; PEFT keeps a dropped copy per module, and on
    # CPU (non-fused dropout) a float mask too.
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), h), "o_in": (("o_proj",), q),
              "mlp_in": (("gate_proj", "up_proj"), h), "down_in": (("down_proj",), inter)}
    adapter_inputs = 0
    for names, width in groups.values():
        n = sum(1 for nm in names if nm in leaf)
        if n and not drop:
            adapter_inputs += width * s
        elif n and lean.lean:
            adapter_inputs += width * s + n * width
        elif n:
            adapter_inputs += n * width * (2 * s if device == "cpu" else s + 1)
    n_adapted = sum(1 for nm in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                    if nm in leaf)
    lora_mid = n_adapted * r * s  # lora_A outputs, kept for lora_B's weight gradient

    # Packed rows run per-example attention (attention.varlen_attention, or FlashAttention2's varlen):
    # no mask, GQA without copies. Padded batches use SDPA with a B x L x L mask, which on CPU/CUDA
    # makes SDPA repeat k and v to every head (copies, and those are what it keeps).
    packed = rows == 1 and cfg.data.packing
    kv_saved = 2 * q if (nkv != nh and not packed) else 2 * kv
    per_layer = (
        2 * h * s  # residual inputs of the two RMSNorms (x, x + attn)
        + (q + kv_saved) * s  # rotated q, k and v as SDPA keeps them
        + q * s  # SDPA output
        + 2 * inter * s  # gate and up (lean.swiglu recomputes silu(gate) in the backward)
        + nh * 4 + 2 * 4  # SDPA log-sum-exp, RMSNorm rsqrt (fp32)
        + adapter_inputs + lora_mid
    )
    if dora and not lean.lean:
        # PEFT's DoRA keeps the base and the LoRA output of each adapted module and a few more
        # out-sized tensors (measured on nf4, fp32 CPU: 2.0-2.3 x out per module at 16 and 2 layers).
        per_layer += int(sum(m.out_features for m in targets) / max(layers, 1) * 2.1 * s)
    elif dora:
        # Lean DoRA keeps each module's output for the magnitude gradient; gate/up/v outputs are kept by
        # the next op anyway, so only q, k, o and down outputs add memory.
        per_layer += sum(w for nm, w in (("q_proj", q), ("k_proj", kv), ("o_proj", h), ("down_proj", h))
                         if nm in leaf) * s

    # ---- loss over the vocabulary: the log-softmax (kept for backward), its gradient and the logits'
    # gradient are alive together at the start of backward; bf16/fp16 logits are upcast first.
    loss_chunk = plan.loss_chunk(vocab)
    if loss_chunk:
        # Chunked (loss.py): one chunk's logits at a time (one fp32 buffer, turned into the softmax gradient
        # in place; with bf16/fp16 also the gradient's cast for the matmul), plus the response positions'
        # hidden states and their gradient, which is what the forward keeps for the backward.
        # Under autocast over wider weights, lm_head's weight is cast to the compute dtype once as well.
        loss = (min(loss_chunk, K) * vocab * (4 if s == 4 else 6) + 2 * K * h * s
                + (vocab * h * s if w_bytes > s else 0))
    else:
        loss = K * vocab * (12 if s == 4 else 14)
    # Backward's working set inside one layer (gradients of the SwiGLU intermediates, hidden states).
    backward_ws = T * (3 * inter + 3 * h) * s
    if cfg.model.gradient_checkpointing:
        # Only each layer's input is kept in forward. The peak is either the loss buffers on top of
        # those, or later one layer's recomputed activations and gradients (the loss buffers are gone).
        activations = T * (layers * h * s + h * s)
        if cfg.model.quantization == "int8":
            # bitsandbytes' int8 matmul keeps its input as a ctx attribute, outside checkpointing's saved-
            # tensor hooks, so every layer's linear inputs stay alive anyway (16 layers: +1.8 GiB measured).
            activations += T * layers * (2 * h + q + inter) * s
        logits_loss = max(loss, T * per_layer + backward_ws)
    else:
        activations = T * (layers * per_layer + h * s)  # + the final norm's input
        logits_loss = max(loss, backward_ws)
    if not packed:
        logits_loss += rows * (T // max(rows, 1)) ** 2  # SDPA's boolean padding mask

    tensors = (weights + quant_stats + dequant_buffer + merged_weights + adapter_b + grads + optimizer + activations
               + logits_loss)
    if device == "cpu" and rt.malloc == "return":
        overhead = _CPU_RETURNING_OVERHEAD
    else:
        overhead = (_RUNTIME_OVERHEAD.get(device, _RUNTIME_OVERHEAD["cpu"])
                    + int(_FRAGMENTATION.get(device, 0.05) * tensors))
    breakdown = {
        "weights": weights,
        **({"quant stats": quant_stats, "dequant buffer": dequant_buffer}
           if cfg.model.quantization != "none" else {}),
        "merged weights": merged_weights,
        "adapter": adapter_b,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits/loss": logits_loss,
        "overhead": overhead,
    }
    total = sum(breakdown.values())
    avail = available_memory(cfg, device)
    notes = [f"{total_params / 1e6:.1f}M frozen parameters in {w_bytes * 8}-bit, "
             f"{adapter / 1e6:.2f}M adapter parameters ({p.method}, r={r}, {len(targets)} modules), {precision}"]
    if cfg.model.quantization != "none":
        n_q = sum(m.in_features * m.out_features for m in linears if not m.name.endswith("lm_head"))
        notes[0] = (f"{n_q / 1e6:.1f}M parameters quantized to {cfg.model.quantization} "
                    f"({'1 byte' if cfg.model.quantization == 'int8' else '4 bits'} each + block statistics), "
                    f"{(total_params - n_q) / 1e6:.1f}M (embeddings, norms, lm_head) in {w_bytes * 8}-bit, "
                    f"{adapter / 1e6:.2f}M adapter parameters ({p.method}, r={r}, {len(targets)} modules), {precision}")
    if tokens_per_micro_batch is None:
        notes.append(f"worst case: every example {seq} tokens (data.max_seq_length)")
    notes.append(f"loss over the {vocab:,}-token vocabulary in chunks of {loss_chunk} positions "
                 "(training.loss_chunk_size)" if loss_chunk else
                 f"loss over the {vocab:,}-token vocabulary in one piece (training.loss_chunk_size=0, or auto "
                 f"below a {AUTO_MIN_VOCAB:,}-token vocabulary)")
    return MemoryPlan(
        total_bytes=total, breakdown=breakdown, available_bytes=avail,
        fits=avail is None or total <= avail, device=device, micro_batch_size=micro,
        tokens_per_micro_batch=T, notes=notes,
    )


def largest_micro_batch(cfg: Config, model_config: PretrainedConfig, run_plan: RunPlan | str,
                        lengths: list[int] | None = None, upper: int | None = None,
                        lean: LeanPolicy | None = None) -> tuple[int, MemoryPlan]:
    """The largest micro-batch (1..upper) whose planned peak fits, and its plan.

    `lengths` are the tokenized example lengths: a micro-batch of b is planned at the b longest (its
    worst case). Raises nothing: if even 1 does not fit, (1, plan) comes back with plan.fits False.
    `run_plan` and `lean` as for plan_memory.
    """
    upper = upper or cfg.training.base_micro_batch_size * cfg.training.gradient_accumulation_steps
    longest = sorted(lengths or [], reverse=True)
    run_plan = _as_plan(cfg, run_plan, lean)

    def plan(b: int) -> MemoryPlan:
        if not longest:
            return plan_memory(cfg, model_config, run_plan, b)
        tokens = sum(longest[:b]) if cfg.data.packing else b * longest[0]
        return plan_memory(cfg, model_config, run_plan, b, tokens_per_micro_batch=tokens,
                           rows_per_micro_batch=1 if cfg.data.packing else b, loss_tokens_per_micro_batch=tokens)

    best, best_plan = 1, plan(1)
    if not best_plan.fits:
        return best, best_plan
    lo, hi = 1, upper  # memory grows with b: binary search the boundary
    while lo < hi:
        mid = (lo + hi + 1) // 2
        pm = plan(mid)
        if pm.fits:
            lo, best, best_plan = mid, mid, pm
        else:
            hi = mid - 1
    return best, best_plan


def auto_batch_size(cfg: Config, model_config: PretrainedConfig, run_plan: RunPlan | str,
                    lengths: list[int], lean: LeanPolicy | None = None) -> tuple[int, int, MemoryPlan]:
    """(micro_batch_size, gradient_accumulation_steps, plan) for training.auto_batch_size.

    The global batch the user configured (micro x accumulation) is kept: the micro-batch becomes its
    largest divisor whose planned peak fits the budget, and accumulation makes up the rest. The examples
    of each optimizer step stay the same, only their split into forward passes changes. `run_plan` and
    `lean` as for plan_memory.
    """
    from llama_lora.errors import LlamaLoraError

    tc = cfg.training
    global_batch = tc.base_micro_batch_size * tc.gradient_accumulation_steps
    run_plan = _as_plan(cfg, run_plan, lean)
    fit, plan = largest_micro_batch(cfg, model_config, run_plan, lengths, upper=global_batch)
    if not plan.fits:
        raise LlamaLoraError(
            f"Even a micro-batch of 1 is predicted to need {_fmt(plan.total_bytes)}, more than the "
            f"{_fmt(plan.available_bytes or 0)} available ({run_plan.device}). Lower data.max_seq_length, turn on "
            "model.gradient_checkpointing=true, use a smaller model, or raise training.memory_budget_gb "
            "if the budget is too strict.\n" + plan.report()
        )
    micro = max(d for d in range(1, fit + 1) if global_batch % d == 0)
    if micro != fit:
        _, plan = largest_micro_batch(cfg, model_config, run_plan, lengths, upper=micro)
    return micro, global_batch // micro, plan


def batch_split(cfg: Config, model_config: PretrainedConfig, run_plan: RunPlan | str, lengths: list[int],
                lean: LeanPolicy | None = None) -> tuple[Config, str | None]:
    """The config that trains, with training.micro_batch_size resolved to a number, and the log line
    saying how (None when nothing was chosen).

    Where `planner_sizes_batch(device)` (auto_batch_size, or an 'auto' micro-batch on CUDA) the planner
    picks it as auto_batch_size does, keeping the global batch; otherwise the configured number ('auto':
    DEFAULT_MICRO_BATCH). train.py saves what this returns as the run's config.yaml.
    """
    tc = cfg.training
    run_plan = _as_plan(cfg, run_plan, lean)
    if not tc.planner_sizes_batch(run_plan.device):
        if tc.micro_batch_size != "auto":
            return cfg, None
        micro, accum, line = tc.base_micro_batch_size, tc.gradient_accumulation_steps, None
    else:
        micro, accum, plan = auto_batch_size(cfg, model_config, run_plan, lengths)
        why = "training.auto_batch_size" if tc.auto_batch_size else "training.micro_batch_size=auto on CUDA"
        budget = f"{plan.available_bytes / 2**30:.2f} GiB" if plan.available_bytes else "unknown"
        line = (f"{why}: micro-batch {micro} x {accum} accumulation (configured {tc.base_micro_batch_size} x "
                f"{tc.gradient_accumulation_steps}); planned peak {plan.total_bytes / 2**30:.2f} GiB of {budget}")
    training = tc.model_copy(update={"micro_batch_size": micro, "gradient_accumulation_steps": accum})
    return cfg.model_copy(update={"training": training}), line


# ----------------------------------------------------------------------------------------------------
# Measuring the real peak, to check the plan (tests, benchmarks/bench.py).


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the tensors alive between steps: weights, buffers, gradients, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    # bitsandbytes' block statistics live on the weights' quant_state, not in parameters or buffers
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            tensors += [t for t in (qs.absmax, qs.code) if torch.is_tensor(t)]
            qs = getattr(qs, "state2", None)
        if torch.is_tensor(getattr(p, "SCB", None)):
            tensors.append(p.SCB)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta"}
    return sum(storages.values())


def measure_peak_bytes(run_one_step, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Peak bytes of all tensors during `run_one_step()`: the resident tensors plus the high-water mark of
    what the call allocates. On CUDA that is the allocator's own statistic; on CPU (which keeps none)
    PyTorch's profiler reports every allocation with a running total."""
    base = resident_bytes(model, optimizer)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_one_step()
        torch.cuda.synchronize()
        return base + torch.cuda.max_memory_allocated() - start
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_one_step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == torch._C._profiler._EventType.Allocation:
            events.append((ev.start_time_ns, ev.extra_fields.ptr, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    # The profiler's own running total is process-wide and outlives a profiling session (blocks allocated
    # in an earlier profiled call, e.g. another model's, count until freed, whenever that is): the high-
    # water mark is summed here from this call's allocations and the frees of those alone.
    live, total, high = set(), 0, 0
    for _, ptr, size in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue
        total += size
        high = max(high, total)
    return base + high
