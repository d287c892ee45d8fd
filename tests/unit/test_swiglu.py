"""lean.swiglu: the MLP keeps gate and up for the backward, not silu(gate) too, with the unpatched
model's outputs and gradients."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora.lean.swiglu import use_lean_swiglu

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _step(model, ids):
    """Loss, every parameter's gradient, and the bytes autograd saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_lean_swiglu_equals_autograd_and_saves_one_intermediate_per_layer():
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**CFG), attn_implementation="eager")
    lean = copy.deepcopy(plain)
    assert use_lean_swiglu(lean) == CFG["num_hidden_layers"]
    ids = torch.randint(0, CFG["vocab_size"], (2, 24))
    loss_p, grads_p, saved_p = _step(plain, ids)
    loss_l, grads_l, saved_l = _step(lean, ids)
    assert torch.equal(loss_p, loss_l)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_l[name], g, rtol=0, atol=1e-7, msg=name)
    # One silu(gate) per layer no longer kept: batch x tokens x intermediate fp32 values each.
    assert saved_p - saved_l == CFG["num_hidden_layers"] * 2 * 24 * CFG["intermediate_size"] * 4


def test_other_activations_are_left_alone():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CFG, hidden_act="gelu"))
    assert use_lean_swiglu(model) == 0
