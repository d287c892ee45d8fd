"""Padding-free attention for packed rows: one packed row holds several examples; each attends within
itself, causally, at a cost of sum L_i^2 rather than T^2 with a T x T mask.

`use_varlen_attention(model)` registers `varlen_attention` with transformers (AttentionInterface, and a
mask function that builds no mask for unpadded rows) and switches an SDPA model to it. The example
boundaries are read from position_ids (where positions stop counting up), as FlashAttention2's varlen
path does in transformers.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "llama_lora_varlen"



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
def flash_varlen():
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
    flash = flash_varlen() if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) else None
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
