"""The arithmetic of the lean step: autograd Functions and the low-rank products they are built from.

Nothing here knows PEFT: every function takes tensors (layer.py reads them off PEFT's modules). The
algebra is in the package docstring (llama_lora/lean/__init__.py).
"""

from __future__ import annotations

import torch

from llama_lora.lean import native


def dropout_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(boolean keep-mask, 1/(1-p')) with p' = p rounded to 1/32768.

    Four mask entries come from one 64-bit random draw (each a uniform 15-bit lane), which on CPU is
    several times cheaper than bernoulli_ and was the largest single cost a LoRA step adds to the frozen
    one (benchmarks/README.md, dropout).
    """
    k = round(p * 32768)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    keep = bits.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF) >= k
    return keep, 32768.0 / (32768 - k)


class DropoutLoraA(torch.autograd.Function):
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
            keep, ks = dropout_keep(x, p)
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


class DoraScale(torch.autograd.Function):
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
        h = DropoutLoraA.apply(x2, p, lora_a) if p else x2 @ lora_a.t()
    out = x2 @ weight.t()  # the frozen base output, which the adapter is added into (no second matmul)
    out.addmm_(h, lora_b.t(), alpha=scale)
    if magnitude is not None:
        out = DoraScale.apply(out, magnitude, norm)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


def weight_row_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 per output row, fp32 (computed once per frozen weight)."""
    with torch.no_grad():
        return weight.float().pow(2).sum(1)


def dora_row_norm(weight: torch.Tensor, w_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """||W + s B A|| per output row, detached, from ||W||^2 rows (`w_sq`) and low-rank products:

        n^2 = ||W||^2_row + 2s <(W A^T)_row, B_row> + s^2 <(B (A A^T))_row, B_row>   (B@A never formed)
    """
    with torch.no_grad():
        a32, b32 = a.float(), b.float()
        wa = weight.to(a32.dtype) @ a32.t()  # (out, r)
        aa = a32 @ a32.t()  # (r, r)
        sq = w_sq + 2 * scale * (wa * b32).sum(1) + scale * scale * ((b32 @ aa) * b32).sum(1)
        return sq.clamp_min(0).sqrt()


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  dora: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W + s B A in fp32, detached; DoRA's row norm of it, or None)."""
    with torch.no_grad():
        w = torch.addmm(weight.float(), b.float(), a.float(), alpha=scale)
        return w, (w.norm(dim=1) if dora else None)


def group_lora_a(x2: torch.Tensor, a_mats: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The rank-r activations of the layers in one input-sharing group, as one matmul."""
    if len(a_mats) == 1:
        return (x2 @ a_mats[0].t(),)
    return (x2 @ torch.cat(a_mats).t()).split([a.shape[0] for a in a_mats], dim=1)


class MergedLora(torch.autograd.Function):
    """The k adapted Linears that read one x (q/k/v, gate/up, or a single one), computed against their
    merged weights W_i' = W_i + s_i B_i A_i (detached; the package docstring gives the algebra). The
    backward's rank-r products go through native.py: its CPU kernel where `kernel`, else torch.

    apply(x, scales, kernel, a, *merged, *b): `a` the group's A matrices stacked, then the k merged
    weights, then the k B matrices; returns the k outputs."""

    @staticmethod
    def forward(ctx, x, scales, kernel: bool, a, *merged_then_b):
        k = len(merged_then_b) // 2
        outs = tuple(x @ w.t() for w in merged_then_b[:k])
        # h by BLAS: for x A^T alone the kernel measured slower in a step, though faster on its own
        # (benchmarks/README.md, "What changed the CPU step", the rank-r CPU kernel row); it wins where it
        # fuses (gh with dB) or replaces a long-K product (dA).
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
