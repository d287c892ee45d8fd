"""A lean training step for PEFT LoRA/DoRA layers, and padding-free attention for packed rows.

Profiling a LoRA step on CPU (benchmarks/README.md) shows the time in the frozen matmuls; what an
adapter adds on top is many small ops per layer: a dropout copy of the input per module, the LoRA
product, a scaling multiply and an add, each with its autograd node and saved tensors; and PEFT's DoRA
also materialises B@A and W + s*B@A (out x in) every forward, and with dropout recomputes the whole base
matmul on the dropped input. Here each adapted Linear computes

  h = drop(x) A^T       without dropout, one matmul over the stacked [A_1; ...; A_k] of the k layers
                        that read the same x (q/k/v, gate/up): rank-16 matmuls run far below the big
                        ones' FLOP/s on CPU, wider ones less so. With dropout (per-layer masks, PEFT's
                        semantics) an autograd Function keeps a 1-byte mask instead of a dropped copy.
  z = x W^T  (+)=  s h B^T       the frozen base output, with the adapter added into it in place
  DoRA  y = (m / n) z,  n = ||W + s B A||_row, detached (DoRA paper, sec. 4.3), computed as
        n^2 = ||W||^2_row + 2s <(W A^T)_row, B_row> + s^2 <(B (A A^T))_row, B_row>
        from the cached ||W||^2 rows and low-rank products: B@A is never formed, and n is computed once
        per optimizer step (it only changes when A or B do). The scaling is in place and saves only y
        (the magnitude's gradient is sum_t g*y / m), which the next op usually saves anyway.

Merged step (fp32 without dropout, on CPU by default: peft.lean_merged). Each layer's W' = W + s B A is
formed once per optimizer step (it only changes when A or B do) and a micro-batch computes

  z = x W'^T            one matmul, as the frozen model's; saved: x and h = x A^T (N x r, for dB)
  backward: dx = g W'   (the frozen model's input-gradient matmul; summed over q/k/v inside the matmul)
            gh = s g B,  dB = s g^T h,  dA = gh^T x

so the adapter's in-place add into z (a pass over the output), its product gh A and the add of that into
dx (two passes over the input gradient) leave every micro-batch: a third fewer adapter FLOPs; on the
40M CPU benchmark LoRA +2.8% and DoRA +4.1% tokens/s (benchmarks/README.md). The cost is one copy
of each adapted weight in memory (the planner counts it), and only fp32 qualifies: rounded to bf16,
W + s B A would lose the update s B A, which is far below W's last bit early in training.
On CPU the backward's rank-r products (gh with dB in one pass over g, and dA) run in native.py's C kernel
where it builds (peft.lean_kernel): BLAS runs such narrow products at a third to a half of its rate.

In the low-rank step everything except the dropout mask and DoRA's scaling is plain differentiable
torch ops: their backward runs in autograd's C++ engine, which measured 3-5% of a CPU step faster than
the same arithmetic in two Python autograd Functions per layer (40M benchmark, LoRA step vs the same
floor 1.13-1.15x -> 1.07-1.10x in repeated runs; benchmarks/README.md). The merged step needs one
Function (autograd cannot route dA, dB around a detached W'), one per input-sharing group.

The parameters, their names and the saved files are PEFT's own (only the module's forward is replaced),
so `save_pretrained` writes a standard adapter that plain `peft` loads with equal outputs. With dropout,
DoRA's magnitude scales the base output of the *undropped* input (the paper's formula) where PEFT adds a
second base matmul on the dropped input; without dropout, and in eval, the two are identical.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref

import torch
import torch.nn.functional as F

from llama_lora import native

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "llama_lora_varlen"


# ----------------------------------------------------------------------------------------------------
# The fused LoRA/DoRA linear.


def _dropout_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(boolean keep-mask, 1/(1-p')) with p' = p rounded to 1/32768.

    Four mask entries come from one 64-bit random draw (each a uniform 15-bit lane), which on CPU is
    ~4x cheaper than bernoulli_ and was the largest single cost a LoRA step adds to the frozen one.
    """
    k = round(p * 32768)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    keep = bits.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF) >= k
    return keep, 32768.0 / (32768 - k)


class _DropoutLoraA(torch.autograd.Function):
    """h = dropout(x, p) @ A^T for a 2-D x, saving x (which the base matmul saves anyway) and a 1-byte
    mask rather than a dropped copy of x; backward rebuilds the dropped input from them."""

    @staticmethod
    def forward(ctx, x, p: float, a):
        if x.is_cuda:
            # One fused kernel draws the mask and applies it (the CPU trick below costs 4 launches here).
            dropped, keep = torch.native_dropout(x, p, True)
            ks, h = 1.0 / (1.0 - p), dropped @ a.t()
            del dropped
        else:
            # Dropout scale folded into the rank-r activation (T x r) rather than the input (T x in).
            keep, ks = _dropout_keep(x, p)
            h = (torch.where(keep, x, 0) @ a.t()).mul_(ks)
        ctx.save_for_backward(x, keep, a)
        ctx.ks = ks
        return h

    @staticmethod
    def backward(ctx, gh):
        x, keep, a = ctx.saved_tensors
        gh = gh.to(a.dtype) * ctx.ks
        grad_a = gh.t() @ torch.where(keep, x, 0) if ctx.needs_input_grad[2] else None
        grad_x = (gh @ a).masked_fill_(~keep, 0) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_a


class _DoraScale(torch.autograd.Function):
    """y = z * (m / n) in place, n detached; saves y alone (PEFT-style `z * c` would keep z and y)."""

    @staticmethod
    def forward(ctx, z, magnitude, norm):
        c = (magnitude / norm).to(z.dtype)
        y = z.mul_(c)
        ctx.mark_dirty(y)
        ctx.save_for_backward(y, magnitude, c)
        return y

    @staticmethod
    def backward(ctx, g):
        y, magnitude, c = ctx.saved_tensors
        # = sum_t g * z / n, as z = y / c and c * n = m; summed in fp32, the magnitude's dtype
        grad_m = (g.float() * y.float()).sum(0) / magnitude if ctx.needs_input_grad[1] else None
        return g * c, grad_m, None


def lean_linear(x, weight, bias, lora_a, lora_b, magnitude, norm, scale: float, p: float,
                h: torch.Tensor | None = None) -> torch.Tensor:
    """One adapted Linear, y = x W^T + s drop(x) A^T B^T (DoRA: times m / n), everything in x's dtype.

    `h`, the rank-r activation, when the caller computed it already (a shared input group)."""
    x2 = x.reshape(-1, x.shape[-1])
    if h is None:
        h = _DropoutLoraA.apply(x2, p, lora_a) if p else x2 @ lora_a.t()
    out = x2 @ weight.t()  # the frozen base output, which the adapter is added into (no second matmul)
    out.addmm_(h, lora_b.t(), alpha=scale)
    if magnitude is not None:
        out = _DoraScale.apply(out, magnitude, norm)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


def _row_norm(module, name: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s B A|| per output row, detached, from low-rank products; cached until W, A or B change."""
    key = (weight._version, a._version, b._version, a.data_ptr(), b.data_ptr(), scale)
    cache = module.__dict__.setdefault("_lean_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        w_key = (weight.data_ptr(), weight._version)
        w_sq = cache.get("w_sq")
        if w_sq is None or w_sq[0] != w_key:
            w_sq = (w_key, weight.float().pow(2).sum(1))  # the frozen weight's squared row norms, once
            cache["w_sq"] = w_sq
        a32, b32 = a.float(), b.float()
        wa = weight.to(a32.dtype) @ a32.t()  # (out, r)
        aa = a32 @ a32.t()  # (r, r)
        sq = w_sq[1] + 2 * scale * (wa * b32).sum(1) + scale * scale * ((b32 @ aa) * b32).sum(1)
        norm = sq.clamp_min(0).sqrt()
    cache[name] = (key, norm)
    return norm


class _MergedLora(torch.autograd.Function):
    """The k adapted Linears that read one x (q/k/v, gate/up, or a single one), computed against their
    merged weights W_i' = W_i + s_i B_i A_i (detached; the module docstring gives the algebra). The
    backward's rank-r products go through native.py: its CPU kernel where `kernel`, else torch."""

    @staticmethod
    def forward(ctx, x, scales, kernel: bool, a, *merged_then_b):
        k = len(merged_then_b) // 2
        outs = tuple(x @ w.t() for w in merged_then_b[:k])
        # h by BLAS: for x A^T alone the kernel measured slower in a step (40 vs 33 ms per 40M step), though
        # faster on its own; it wins where it fuses (gh with dB) or replaces a long-K product (dA).
        ctx.save_for_backward(x, x @ a.t(), a, *merged_then_b)
        ctx.scales, ctx.kernel = scales, kernel
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, h, a, *rest = ctx.saved_tensors
        k = len(rest) // 2
        merged, bs = rest[:k], rest[k:]
        # gh_i = s g_i B_i and dB_i = s g_i^T h_i, one pass over g_i with the kernel
        parts = [native.proj_and_wgrad(g, b, hi, s, ctx.kernel)
                 for g, b, hi, s in zip(grads, bs, h.split([b.shape[1] for b in bs], dim=1), ctx.scales)]
        gh = parts[0][0] if k == 1 else torch.cat([p[0] for p in parts], dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0] @ merged[0]
            for g, w in zip(grads[1:], merged[1:]):
                grad_x.addmm_(g, w)  # the group's input gradients summed inside the matmuls
        grad_a = native.wgrad(x, gh, kernel=ctx.kernel).t() if ctx.needs_input_grad[3] else None
        return (grad_x, None, None, grad_a) + (None,) * k + tuple(p[1] for p in parts)


def _merged_weight(module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W + s B A, fp32, detached; DoRA's row norm of it or None), cached until W, A or B change."""
    base, a, b = module.get_base_layer(), module.lora_A[name].weight, module.lora_B[name].weight
    scale, dora = float(module.scaling[name]), name in module.lora_magnitude_vector
    key = (name, base.weight._version, a._version, b._version, base.weight.data_ptr(), a.data_ptr(), b.data_ptr(),
           scale, dora)
    hit = module.__dict__.get("_lean_merged_weight")
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        w = torch.addmm(base.weight.float(), b.float(), a.float(), alpha=scale)
        value = (w, w.norm(dim=1) if dora else None)
    module.__dict__["_lean_merged_weight"] = (key, value)
    return value


def _merged_outputs(members, name: str, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    merged = [_merged_weight(m, name)[0] for m in members]
    a = [m.lora_A[name].weight for m in members]
    b = [m.lora_B[name].weight for m in members]
    if not torch.is_grad_enabled() or not (x2.requires_grad or any(t.requires_grad for t in a + b)):
        return tuple(x2 @ w.t() for w in merged)  # inference: the merged model, no adapter work at all
    scales = tuple(float(m.scaling[name]) for m in members)
    kernel = bool(members[0].__dict__.get("_lean_native"))
    return _MergedLora.apply(x2, scales, kernel, a[0] if len(a) == 1 else torch.cat(a), *merged, *b)


def _lean_forward(self, x, *args, **kwargs):
    """Replacement forward of one peft.tuners.lora.Linear; PEFT's own for anything it does not cover."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (
        args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
        or not _lean_capable(self, name)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    drop = self.lora_dropout[name]
    p = drop.p if self.training and isinstance(drop, torch.nn.Dropout) else 0.0
    scale = float(self.scaling[name])
    magnitude = self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None
    dev = x.device.type
    amp = torch.is_autocast_enabled(dev)
    if amp:
        # Compute in the autocast dtype as PEFT's layers would, but with explicit casts so that in-place
        # ops and the Functions' backward (which autocast does not cover) see one dtype; grads flow back
        # to fp32 adapters through the casts.
        cd = torch.get_autocast_dtype(dev)
        xc, bias = x.to(cd), None if base.bias is None else base.bias.to(cd)
        m = None if magnitude is None else magnitude.float()
    else:
        cd = a.dtype
        xc, bias, m = x.to(cd), base.bias, magnitude
    x2 = xc.reshape(-1, xc.shape[-1])
    if p == 0 and cd == torch.float32 and self.__dict__.get("_lean_merged"):
        out = _shared(self, name, x, "merged", lambda members: _merged_outputs(members, name, x2))
        if magnitude is not None:
            out = _DoraScale.apply(out, m, _merged_weight(self, name)[1])
        if bias is not None:
            out = out + bias
        out = out.view(*x.shape[:-1], out.shape[-1])
    else:
        norm = None if magnitude is None else _row_norm(self, name, base.weight, a, b, scale)
        h = None
        if p == 0:
            h = _shared(self, name, x, cd, lambda members: _group_lora_a(
                x2, [mm.lora_A[name].weight.to(cd) for mm in members]))
        out = lean_linear(xc, base.weight.to(cd), bias, a.to(cd) if h is None else None, b.to(cd), m, norm, scale, p, h)
    return out if amp or out.dtype == x.dtype else out.to(x.dtype)


def _group_lora_a(x2: torch.Tensor, a_mats: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The rank-r activations of the layers in one input-sharing group, as one matmul."""
    if len(a_mats) == 1:
        return (x2 @ a_mats[0].t(),)
    return (x2 @ torch.cat(a_mats).t()).split([a.shape[0] for a in a_mats], dim=1)


def _shared(module, name: str, x: torch.Tensor, tag, compute):
    """This layer's part of `compute(members)`, evaluated once for its input-sharing group (q/k/v,
    gate/up; a layer outside any group is a group of one): the rank-r activations, or the merged step's
    outputs.

    The group's first layer called with x computes it for all and leaves the results for the others,
    which find them only for that very x (held weakly), unmodified, with unchanged A matrices: otherwise
    (another input, a recomputation under checkpointing) they are computed again, never reused wrongly.
    The last layer to take its part drops the entry: held on, it would keep alive the graph it hangs on
    (under checkpointing, a recomputed layer's activations, which nothing else frees).
    """
    group = module.__dict__.get("_lean_group")
    if group is None:
        return compute((module,))[0]
    members, index, shared = group
    a_mats = [m.lora_A[name].weight for m in members]
    key = (name, tag, x._version, tuple(t._version for t in a_mats), tuple(t.data_ptr() for t in a_mats))
    ref = shared.get("x")
    if ref is None or ref() is not x or shared["key"] != key:
        parts = compute(members)
        shared.clear()
        shared.update(x=weakref.ref(x), key=key, parts=parts, left=set(range(len(members))))
    part = shared["parts"][index]
    shared["left"].discard(index)
    if not shared["left"]:
        shared.clear()
    return part


# Layers that a Llama block calls with the same input tensor: their A matrices can run as one matmul.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _lean_capable(module, name: str) -> bool:
    base = module.get_base_layer()
    return (
        type(base) is torch.nn.Linear
        and not getattr(module, "fan_in_fan_out", False)
        and getattr(module.lora_B[name], "bias", None) is None
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and isinstance(module.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))
    )


def apply_lean(model: torch.nn.Module, merged: bool = False, native_kernel: bool = False) -> int:
    """Route every PEFT LoRA/DoRA Linear of `model` through the fused step; returns how many.

    `merged`: the merged step where it qualifies (fp32, no dropout; the module docstring);
    `native_kernel`: its rank-r products through native.py's CPU kernel (where it is built). Only forward
    methods are swapped on the instances: parameters, state_dict and save_pretrained are untouched, and
    `remove_lean` restores PEFT's forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            name = module.active_adapters[0] if module.active_adapters else None
            if name in module.lora_A and _lean_capable(module, name):
                module.forward = types.MethodType(_lean_forward, module)
                module.__dict__["_lean_merged"] = merged
                module.__dict__["_lean_native"] = native_kernel
                n += 1
        # Input-sharing groups among this module's children (the attention and MLP blocks).
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(module, nm, None) for nm in names]
            if not all(isinstance(m, LoraLinear) and m.active_adapters == members[0].active_adapters
                       for m in members) or len(members[0].active_adapters) != 1:
                continue
            name = members[0].active_adapters[0]
            dtype = members[0].lora_A[name].weight.dtype if name in members[0].lora_A else None
            if all(name in m.lora_A and _lean_capable(m, name) and m.lora_A[name].weight.dtype == dtype for m in members):
                shared: dict = {}
                for i, m in enumerate(members):
                    m.__dict__["_lean_group"] = (tuple(members), i, shared)
    return n


def remove_lean(model: torch.nn.Module) -> None:
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _lean_forward:
            del module.forward
            for key in ("_lean_cache", "_lean_group", "_lean_merged", "_lean_merged_weight", "_lean_native"):
                module.__dict__.pop(key, None)


# ----------------------------------------------------------------------------------------------------
# Padding-free attention: one packed row holds several examples; attend within each, causally.


_SEGMENTS: dict = {}


def _segments(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in a packed row (+ its length): where positions stop counting up.

    Every decoder layer gets the same position_ids tensor, so the offsets are computed (one host sync on
    a GPU) once per forward and reused by the other layers: a one-entry cache that holds the tensor
    weakly and hits only for that very object, unmodified.
    """
    ref = _SEGMENTS.get("ref")
    if ref is not None and ref() is position_ids and _SEGMENTS["version"] == position_ids._version:
        return _SEGMENTS["bounds"]
    pos = position_ids[0]
    restart = torch.ones_like(pos, dtype=torch.bool)
    restart[1:] = pos[1:] != pos[:-1] + 1
    bounds = restart.nonzero().flatten().tolist() + [pos.numel()]
    _SEGMENTS.update(ref=weakref.ref(position_ids), version=position_ids._version, bounds=bounds, cu=None)
    return bounds


def _cu_seqlens(bounds: list[int], device) -> torch.Tensor:
    if _SEGMENTS.get("cu") is None or _SEGMENTS["cu"].device != device:
        _SEGMENTS["cu"] = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    return _SEGMENTS["cu"]


@functools.cache
def _flash_varlen():
    """PyTorch's FlashAttention varlen kernel as f(q, k, v, cu, max_len, scale, gqa), or None.

    torch.nn.attention.varlen exists from torch 2.9 (CUDA, bf16/fp16); its causal and GQA arguments
    changed between releases, so the call is fitted to the installed signature.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    has_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def call(q, k, v, cu, longest, scale, gqa):
        if gqa and not has_gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        extra = dict(causal)
        if has_scale:
            extra["scale"] = scale
        if gqa and has_gqa:
            extra["enable_gqa"] = True
        return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)

    call.has_scale = has_scale
    return call


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Causal attention within each packed example (cost sum L_i^2, not T^2 with a T x T mask).

    On CUDA with bf16/fp16 this is one call of PyTorch's FlashAttention varlen kernel (what flash-attn's
    flash_attn_varlen_func does, without the extra package); elsewhere SDPA runs per example. Padded
    batches (an attention mask) and generation fall back to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    if attention_mask is not None or pos is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = _segments(pos)
    gqa = query.shape[1] != key.shape[1]
    flash = _flash_varlen() if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) else None
    if flash is not None and dropout == 0.0 and (flash.has_scale or scaling is None):
        # (1, H, T, D) -> (T, H, D), one kernel for all the row's examples
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
        out = flash(q, k, v, _cu_seqlens(bounds, query.device), longest, scaling, gqa)
        return out.unsqueeze(0), None  # (1, T, H, D), what transformers' attention functions return
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    # No mask for unpadded (packed) rows: varlen_attention reads the example boundaries from
    # position_ids, so the T x T boolean mask is never built. Padded batches get SDPA's usual mask.
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen_attention(model) -> bool:
    """Switch an SDPA model to varlen_attention (registered with transformers); False if not applicable."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    base.set_attn_implementation(VARLEN_ATTENTION)
    return base.config._attn_implementation == VARLEN_ATTENTION


def lean_enabled(peft_cfg, device: str) -> bool:
    """peft.lean resolved for a device. auto: the lean step on CPU (LoRA 1.13x, DoRA 1.21x faster than
    PEFT's forward on the 40M benchmark, less memory) and for DoRA everywhere (H100, 1B shape: 1.4-1.5x
    faster, 30% less memory); PEFT's forward for LoRA on a GPU, where a step is bound by kernel launches
    and Python, and the lean step's Python backward measured 10-18% slower (benchmarks/README.md)."""
    if peft_cfg.lean != "auto":
        return bool(peft_cfg.lean)
    return device == "cpu" or peft_cfg.method == "dora"


def lean_merged_enabled(peft_cfg, device: str) -> bool:
    """peft.lean_merged resolved for a device (it takes effect only in fp32 and without dropout). auto: on
    CPU, where a step is bound by memory traffic and the merged step removes three passes over
    activations per layer (40M benchmark: LoRA +2.8%, DoRA +4.1% tokens/s); on a GPU, where training
    runs in bf16 anyway, an fp32 run keeps PEFT's or the low-rank lean step (not measured there)."""
    if peft_cfg.lean_merged != "auto":
        return bool(peft_cfg.lean_merged)
    return device == "cpu"


def lean_kernel_enabled(peft_cfg, device: str) -> bool:
    """peft.lean_kernel resolved for a device: the CPU kernel of native.py, where it builds (auto) or
    must (true: an error names why it cannot)."""
    if peft_cfg.lean_kernel is False or device != "cpu":
        return False
    if native.load() is None:
        if peft_cfg.lean_kernel is True:
            from llama_lora.errors import LlamaLoraError

            raise LlamaLoraError(
                f"peft.lean_kernel=true, but llama-lora's CPU kernel cannot be built here ({native.why()}). "
                "It needs GCC with OpenMP on PATH (e.g. `apt install gcc`); or set peft.lean_kernel=auto "
                "(BLAS where it cannot be built) or false.")
        return False
    return True


def prepare_for_training(model, cfg, lean: bool = True) -> None:
    """What train.py applies after apply_adapter: varlen attention for packed rows, the lean step."""
    if cfg.data.packing and use_varlen_attention(model):
        log.info("Packed rows use per-example attention (%s): no T x T mask, no cross-example blocks.", VARLEN_ATTENTION)
    device = next(model.parameters()).device.type
    if lean and hasattr(model, "peft_config") and lean_enabled(cfg.peft, device):
        merged = lean_merged_enabled(cfg.peft, device)
        kernel = merged and lean_kernel_enabled(cfg.peft, device)
        n = apply_lean(model, merged=merged, native_kernel=kernel)
        log.info("Lean %s step on %d adapted layers (peft.lean=%s, merged weights %s, rank-r products by %s).",
                 cfg.peft.method, n, cfg.peft.lean, "in fp32 without dropout" if merged else "off",
                 "llama-lora's CPU kernel" if kernel else "BLAS")
