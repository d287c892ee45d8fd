"""A lean training step for PEFT LoRA/DoRA layers.

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
dx (two passes over the input gradient) leave every micro-batch: a third fewer adapter FLOPs
(benchmarks/README.md, the merged step). The cost is one copy of each adapted weight in memory (the
planner counts it), and only fp32 qualifies: rounded to bf16, W + s B A would lose the update s B A,
which is far below W's last bit early in training.
On CPU the backward's rank-r products (gh with dB in one pass over g, and dA) run in native.py's C kernel
where it builds (peft.lean_kernel): BLAS runs such narrow products well below its big-matmul rate
(benchmarks/README.md, "What changed the CPU step").

In the low-rank step everything except the dropout mask and DoRA's scaling is plain differentiable
torch ops: their backward runs in autograd's C++ engine, which measured faster than the same arithmetic
in two Python autograd Functions per layer (benchmarks/README.md, "What changed the CPU step", the row
"lean step as plain torch ops"). The merged step needs one Function (autograd cannot route dA, dB around
a detached W'), one per input-sharing group.

The boundary to PEFT is one class, layer.LeanLinear, a `peft.tuners.lora.Linear` that PEFT itself
creates (registered as a custom LoRA module on the LoraConfig) and whose forward falls back to PEFT's for
whatever the lean step does not cover. The parameters, their names and the saved files are PEFT's own,
so `save_pretrained` writes a standard adapter that plain `peft` loads with equal outputs. With dropout,
DoRA's magnitude scales the base output of the *undropped* input (the paper's formula) where PEFT adds a
second base matmul on the dropped input; without dropout, and in eval, the two are identical.

Modules: policy (LeanPolicy, decide: what runs, decided once), layer (LeanLinear, input-sharing groups,
register/attach), functions (the autograd Functions and low-rank products), native (the C kernel).
"""

from __future__ import annotations

from llama_lora.lean import native
from llama_lora.lean.layer import SHARED_INPUT_GROUPS, InputGroup, LeanLinear, attach, lean_layers, register
from llama_lora.lean.policy import LeanPolicy, decide

__all__ = [
    "LeanLinear",
    "LeanPolicy",
    "InputGroup",
    "SHARED_INPUT_GROUPS",
    "attach",
    "decide",
    "lean_layers",
    "native",
    "register",
]
