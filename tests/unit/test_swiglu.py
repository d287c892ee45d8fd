"""lean.swiglu: each SiLU-gated MLP is replaced (not patched) by a LeanSwiGLU that holds the MLP's own
modules and keeps gate and up for the backward, not silu(gate) too, with the original model's outputs,
gradients and state_dict keys; an adapter saved from a model with it loads into plain PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import llama_lora
from llama_lora.lean.swiglu import LeanSwiGLU, use_lean_swiglu

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _model(**overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**CFG, **overrides}), attn_implementation="eager")


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
    plain = _model()
    lean = copy.deepcopy(plain)
    keys = list(lean.state_dict())
    names = [n for n, _ in lean.named_modules()]
    assert use_lean_swiglu(lean) == CFG["num_hidden_layers"]
    assert use_lean_swiglu(lean) == 0  # already replaced
    for layer, ref in zip(lean.model.layers, plain.model.layers):
        assert isinstance(layer.mlp, LeanSwiGLU) and isinstance(ref.mlp, LlamaMLP)
        assert layer.mlp.replaced is LlamaMLP and layer.mlp.intermediate_size == CFG["intermediate_size"]
    assert list(lean.state_dict()) == keys and [n for n, _ in lean.named_modules()] == names
    ids = torch.randint(0, CFG["vocab_size"], (2, 24))
    loss_p, grads_p, saved_p = _step(plain, ids)
    loss_l, grads_l, saved_l = _step(lean, ids)
    assert torch.equal(loss_p, loss_l)
    assert grads_l.keys() == grads_p.keys()
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_l[name], g, rtol=0, atol=1e-7, msg=name)
    # One silu(gate) per layer no longer kept: batch x tokens x intermediate fp32 values each.
    assert saved_p - saved_l == CFG["num_hidden_layers"] * 2 * 24 * CFG["intermediate_size"] * 4


def test_the_replacement_holds_the_very_modules_of_the_mlp():
    model = _model()
    mlp = model.model.layers[0].mlp
    parts = {n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")}
    params = {id(p) for p in model.parameters()}
    use_lean_swiglu(model)
    lean = model.model.layers[0].mlp
    assert all(getattr(lean, n) is m for n, m in parts.items())
    assert {id(p) for p in model.parameters()} == params
    x = torch.randn(3, 5, CFG["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(lean(x), mlp(x), rtol=0, atol=0)


def test_other_activations_and_hooked_mlps_are_left_alone():
    assert use_lean_swiglu(_model(hidden_act="gelu")) == 0
    model = _model()
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: None)  # a replacement would drop it
    assert use_lean_swiglu(model) == CFG["num_hidden_layers"] - 1
    assert isinstance(model.model.layers[0].mlp, LlamaMLP)


def test_no_instance_patches_in_the_source():
    src = Path(llama_lora.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if "MethodType" in p.read_text("utf-8")]
    assert not offenders, offenders


@pytest.mark.parametrize("lean_first", [False, True], ids=["adapter-then-swiglu", "swiglu-then-adapter"])
def test_adapter_saved_with_the_replacement_loads_into_plain_peft(tmp_path, lean_first):
    """Adapter files saved from a model whose MLPs are replaced are byte-for-byte the tensors, names and
    config of the same adapter saved without the replacement, and load into a plain PEFT model (original
    LlamaMLP) with equal outputs."""
    from safetensors.torch import load_file

    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    base = _model()
    if lean_first:
        use_lean_swiglu(base)
    model = get_peft_model(base, LoraConfig(**lora))
    assert use_lean_swiglu(model) == (0 if lean_first else CFG["num_hidden_layers"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "lean")
    plain = get_peft_model(_model(), LoraConfig(**lora))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path / "plain")
    mine, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lean", "plain"))
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (tmp_path / "lean" / "adapter_config.json").read_text() == (
        tmp_path / "plain" / "adapter_config.json").read_text()

    loaded = PeftModel.from_pretrained(_model(), tmp_path / "lean")
    assert not any(isinstance(m, LeanSwiGLU) for m in loaded.modules())
    model.eval(), loaded.eval()
    ids = torch.randint(0, CFG["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
