"""A SwiGLU that keeps two of its three intermediates for the backward.

A Llama MLP computes down(silu(gate(x)) * up(x)). Autograd keeps three intermediate-sized tensors per
token per layer for it: gate (for silu's backward), silu(gate) and up (for the product's). `SiluMul`
keeps gate and up and recomputes silu(gate) in the backward, one sigmoid per element: a sixth less
activation memory on Llama-3.2-1B (benchmarks/README.md, "Memory"). Liger-Kernel's fused
SwiGLU does the same with Triton on CUDA only; this plain-torch one runs on every device. Forward and
gradients are autograd's own ops, so they equal the unpatched model's (tests/unit/test_swiglu.py).

The MLP is replaced, not patched: `use_lean_swiglu` puts a `LeanSwiGLU` in the MLP's place on its parent
(`nn.Module.set_submodule`), holding the very MLP's gate_proj, up_proj, down_proj and act_fn objects.
Parameters, module names and state_dict keys are therefore unchanged, and so are the adapters, checkpoints
and merged models saved from it. transformers offers no kernel-replacement hook for the Llama MLP (its
`use_kernel_forward_from_hub` covers RMSNorm and rotary embeddings, and loads kernels from the Hub).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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


class LeanSwiGLU(nn.Module):
    """The MLP `mlp` computing down(silu(gate(x)) * up(x)) through SiluMul.

    It holds `mlp`'s own gate_proj, up_proj, down_proj and act_fn modules (the same objects, so the same
    parameters under the same names; act_fn is kept for that structure only, SiluMul computes the silu)
    and `mlp`'s plain attributes (config, hidden_size, intermediate_size). `replaced` is `mlp`'s class.
    Outputs and gradients equal `mlp`'s own forward when `mlp` is a SiLU-gated MLP (`is_silu_mlp`).
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, value in vars(mlp).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.train(mlp.training)
        self.replaced = type(mlp)

    def extra_repr(self) -> str:
        return f"replaces {self.replaced.__name__}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _has_hooks(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook") or any(
        getattr(module, d, None) for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                           "_backward_pre_hooks", "_state_dict_hooks",
                                           "_load_state_dict_pre_hooks"))


def is_silu_mlp(module: nn.Module) -> bool:
    """Whether `module` is a SiLU-gated MLP that LeanSwiGLU can replace: its children are exactly
    gate_proj, up_proj, down_proj and a SiLU act_fn (as in Llama, Mistral and Qwen2), it has no
    parameters or buffers of its own (so the replacement's state_dict is the same) and no hooks (which a
    replacement would drop). A LeanSwiGLU is not one: it is already replaced."""
    if isinstance(module, LeanSwiGLU) or _has_hooks(module):
        return False
    if set(dict(module.named_children())) != {*PROJECTIONS, "act_fn"} or not _is_silu(module.act_fn):
        return False
    return not any(True for _ in module.parameters(recurse=False)) and not any(
        True for _ in module.buffers(recurse=False))


def use_lean_swiglu(model: nn.Module) -> int:
    """Replace every SiLU-gated MLP of `model` (`is_silu_mlp`) with a LeanSwiGLU holding its modules, on
    its parent; returns how many it replaced. Other modules, and MLPs already replaced, are left as they
    are. Parameter names and state_dict keys of `model` are unchanged."""
    targets = [name for name, module in model.named_modules() if name and is_silu_mlp(module)]
    for name in targets:
        model.set_submodule(name, LeanSwiGLU(model.get_submodule(name)))
    return len(targets)
