"""LeanLinear, the one boundary between the lean step and PEFT, and the input-sharing groups.

PEFT creates the layers itself: `register(lora_config)` adds LeanLinear to the LoraConfig's custom
modules (PEFT's extension point for LoRA layer types: `LoraConfig._register_custom_module`, dispatched
in `LoraModel._create_new_module` before PEFT's own layers), so every adapted nn.Linear becomes a
LeanLinear, a `peft.tuners.lora.Linear` with PEFT's parameters, names, merge/unmerge and saved files,
whose forward is the lean step where it covers the call and PEFT's own (`super().forward`) elsewhere.
`_custom_modules` is not a field of the config: save_pretrained writes the standard adapter_config.json.
`attach(model, policy)` then sets each layer's flags from the LeanPolicy and wires the groups of layers
that read one input tensor (q/k/v, gate/up).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from peft.tuners.lora import Linear as LoraLinear

from llama_lora.lean import functions

if TYPE_CHECKING:
    from peft import LoraConfig

    from llama_lora.lean.policy import LeanPolicy

# Layers that a Llama block calls with the same input tensor: their A matrices can run as one matmul.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class InputGroup:
    """The adapted layers of one block that read the same input tensor (q/k/v, gate/up), and what the
    first of them to see an input computed for all: the rank-r activations, or the merged step's outputs.

    The group's first layer called with x computes it for all and leaves the results for the others,
    which find them only for that very x (held weakly), unmodified, with unchanged A matrices: otherwise
    (another input, a recomputation under checkpointing) they are computed again, never reused wrongly.
    The last layer to take its part drops the entry: held on, it would keep alive the graph it hangs on
    (under checkpointing, a recomputed layer's activations, which nothing else frees).
    """

    __slots__ = ("members", "_x", "_key", "_parts", "_left")

    def __init__(self, members) -> None:
        self.members: tuple[LeanLinear, ...] = tuple(members)
        self.clear()

    def clear(self) -> None:
        self._x: weakref.ref | None = None
        self._key: tuple | None = None
        self._parts: tuple | None = None
        self._left: set[int] = set()

    @property
    def empty(self) -> bool:
        """Nothing held (after every member took its part of the last input)."""
        return self._parts is None

    def part(self, index: int, name: str, x: torch.Tensor, tag, compute):
        """Member `index`'s part of `compute(members)` for input x, computed once for the group."""
        a_mats = [m.lora_A[name].weight for m in self.members]
        key = (name, tag, x._version, tuple(t._version for t in a_mats), tuple(t.data_ptr() for t in a_mats))
        if self._x is None or self._x() is not x or self._key != key:
            parts = compute(self.members)
            self._x, self._key, self._parts, self._left = weakref.ref(x), key, parts, set(range(len(self.members)))
        part = self._parts[index]
        self._left.discard(index)
        if not self._left:
            self.clear()
        return part


class LeanLinear(LoraLinear):
    """A PEFT LoRA/DoRA Linear that trains through the lean step (llama_lora.lean's docstring).

    State, besides PEFT's own: the policy's flags (`lean_merged`: the merged-weight step where it
    qualifies, fp32 without dropout; `lean_kernel`: its rank-r products through native.py's CPU kernel),
    its input-sharing group, and two caches keyed by the versions of the tensors they derive from:
    DoRA's row norms ||W + s B A|| and the merged weight W + s B A (one per optimizer step).
    """

    lean_merged: bool
    lean_kernel: bool
    lean_group: InputGroup | None
    lean_group_index: int

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lean_merged = False
        self.lean_kernel = False
        self.lean_group = None
        self.lean_group_index = 0
        self._w_sq: tuple | None = None  # ((W ptr, W version), ||W||^2 rows)
        self._row_norms: dict[str, tuple] = {}  # adapter -> (key, ||W + s B A|| rows)
        self._merged_weight: tuple | None = None  # (key, (W + s B A, its row norms or None))

    # ---- what the lean step covers

    def lean_capable(self, name: str) -> bool:
        """Whether the lean step computes adapter `name` of this layer (else PEFT's forward does)."""
        base = self.get_base_layer()
        variant = self.lora_variant.get(name)
        return (
            type(base) is torch.nn.Linear
            and not getattr(self, "fan_in_fan_out", False)
            and getattr(self.lora_B[name], "bias", None) is None
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and isinstance(self.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))
            and (variant is None or name in self.lora_magnitude_vector)  # plain LoRA or DoRA, no other variant
        )

    def lean_adapter(self) -> str | None:
        """The one active adapter the lean step would compute, or None (PEFT's forward then)."""
        active = self.active_adapters
        name = active[0] if len(active) == 1 else None
        if name is None or name not in self.lora_A or not self.lean_capable(name):
            return None
        return name

    # ---- cached derived tensors

    def row_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| per output row, detached, from low-rank products; cached until W, A or B change."""
        weight, a, b = self.get_base_layer().weight, self.lora_A[name].weight, self.lora_B[name].weight
        scale = float(self.scaling[name])
        key = (weight._version, a._version, b._version, a.data_ptr(), b.data_ptr(), scale)
        hit = self._row_norms.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        w_key = (weight.data_ptr(), weight._version)
        if self._w_sq is None or self._w_sq[0] != w_key:
            self._w_sq = (w_key, functions.weight_row_sq(weight))  # the frozen weight's squared row norms, once
        norm = functions.dora_row_norm(weight, self._w_sq[1], a, b, scale)
        self._row_norms[name] = (key, norm)
        return norm

    def merged_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W + s B A, fp32, detached; DoRA's row norm of it or None), cached until W, A or B change."""
        weight, a, b = self.get_base_layer().weight, self.lora_A[name].weight, self.lora_B[name].weight
        scale, dora = float(self.scaling[name]), name in self.lora_magnitude_vector
        key = (name, weight._version, a._version, b._version, weight.data_ptr(), a.data_ptr(), b.data_ptr(),
               scale, dora)
        hit = self._merged_weight
        if hit is not None and hit[0] == key:
            return hit[1]
        value = functions.merged_weight(weight, a, b, scale, dora)
        self._merged_weight = (key, value)
        return value

    @property
    def holds_merged_weight(self) -> bool:
        """Whether this layer keeps a merged weight copy (the planner's "merged weights" term)."""
        return self._merged_weight is not None

    # ---- forward

    def forward(self, x, *args, **kwargs):
        """The lean step for one active plain LoRA/DoRA adapter; PEFT's forward for anything else."""
        name = None if (args or kwargs or self.disable_adapters or self.merged) else self.lean_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
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
        if p == 0 and cd == torch.float32 and self.lean_merged:
            out = self._shared(name, x, "merged", lambda members: _merged_outputs(members, name, x2))
            if magnitude is not None:
                out = functions.DoraScale.apply(out, m, self.merged_weight(name)[1])
            if bias is not None:
                out = out + bias
            out = out.view(*x.shape[:-1], out.shape[-1])
        else:
            norm = None if magnitude is None else self.row_norm(name)
            h = None
            if p == 0:
                h = self._shared(name, x, cd, lambda members: functions.group_lora_a(
                    x2, [mm.lora_A[name].weight.to(cd) for mm in members]))
            out = functions.lean_linear(xc, base.weight.to(cd), bias, a.to(cd) if h is None else None, b.to(cd), m,
                                        norm, scale, p, h)
        return out if amp or out.dtype == x.dtype else out.to(x.dtype)

    def _shared(self, name: str, x: torch.Tensor, tag, compute):
        """This layer's part of `compute(members)`, once for its input-sharing group (a layer outside any
        group is a group of one)."""
        group = self.lean_group
        if group is None:
            return compute((self,))[0]
        return group.part(self.lean_group_index, name, x, tag, compute)


def _merged_outputs(members, name: str, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    merged = [m.merged_weight(name)[0] for m in members]
    a = [m.lora_A[name].weight for m in members]
    b = [m.lora_B[name].weight for m in members]
    if not torch.is_grad_enabled() or not (x2.requires_grad or any(t.requires_grad for t in a + b)):
        return tuple(x2 @ w.t() for w in merged)  # inference: the merged model, no adapter work at all
    scales = tuple(float(m.scaling[name]) for m in members)
    kernel = bool(members[0].lean_kernel)
    return functions.MergedLora.apply(x2, scales, kernel, a[0] if len(a) == 1 else torch.cat(a), *merged, *b)


# ----------------------------------------------------------------------------------------------------
# Wiring.


def register(lora_config: LoraConfig) -> LoraConfig:
    """Make PEFT create LeanLinear for every nn.Linear that `lora_config` adapts; returns the config.

    PEFT matches the key with isinstance, so a Linear subclass becomes a LeanLinear too; the lean step
    covers a base that is exactly nn.Linear and leaves any other to PEFT's forward (`lean_capable`).
    llama-lora loads no quantized models (whose bitsandbytes layers subclass nn.Linear).
    """
    lora_config._register_custom_module({torch.nn.Linear: LeanLinear})
    return lora_config


def lean_layers(model: torch.nn.Module) -> list[LeanLinear]:
    """The layers of `model` that run the lean step (LeanLinear with an adapter it covers)."""
    return [m for m in model.modules() if isinstance(m, LeanLinear) and m.lean_adapter() is not None]


def attach(model: torch.nn.Module, policy: LeanPolicy) -> int:
    """Set every LeanLinear of `model` to `policy` (merged step, kernel) and wire the input-sharing groups;
    returns how many layers run the lean step. Parameters and state_dict are untouched."""
    for module in model.modules():
        if isinstance(module, LeanLinear):
            module.lean_merged, module.lean_kernel = policy.merged, policy.kernel
            module.lean_group, module.lean_group_index = None, 0
            module._merged_weight = None
    for module in model.modules():
        # Input-sharing groups among this module's children (the attention and MLP blocks).
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(module, nm, None) for nm in names]
            if not all(isinstance(m, LeanLinear) and m.active_adapters == members[0].active_adapters
                       for m in members) or len(members[0].active_adapters) != 1:
                continue
            name = members[0].active_adapters[0]
            dtype = members[0].lora_A[name].weight.dtype if name in members[0].lora_A else None
            if all(m.lean_adapter() == name and m.lora_A[name].weight.dtype == dtype for m in members):
                group = InputGroup(members)
                for i, m in enumerate(members):
                    m.lean_group, m.lean_group_index = group, i
    return len(lean_layers(model))
