"""A SwiGLU that keeps two of its three intermediates for the backward (issue 15).

A Llama MLP computes down(silu(gate(x)) * up(x)). Autograd keeps three intermediate-sized tensors per
token per layer for it: gate (for silu's backward), silu(gate) and up (for the product's). `SiluMul`
keeps gate and up and recomputes silu(gate) in the backward, one sigmoid per element: a sixth less
activation memory on Llama-3.2-1B (benchmarks/README.md, "Memory (issue 15)"). Liger-Kernel's fused
SwiGLU does the same with Triton on CUDA only; this plain-torch one runs on every device. Forward and
gradients are autograd's own ops, so they equal the unpatched model's (tests/unit/test_swiglu.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_swiglu(model: nn.Module) -> int:
    """Switch every SiLU-gated MLP (gate_proj, up_proj, down_proj and a SiLU act_fn, as in Llama, Mistral
    and Qwen2) to SiluMul; returns how many. Other MLPs are left as they are."""
    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(
                getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            n += 1
    return n
