"""The lean LoRA/DoRA step computes what PEFT computes (outputs and gradients, fp32), saves standard PEFT
files that plain peft loads with equal outputs, and keeps DoRA's norm right as the adapter trains."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora.kernels import _dropout_keep, lean_linear, _row_norm, apply_lean, remove_lean

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def _peft_model(dora: bool, dropout: float = 0.0, seed: int = 0, r: int = 4):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**CFG), dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear",
                                            use_dora=dora))
    with torch.no_grad():  # B = 0 at init would hide any error in the adapter path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


MERGED = pytest.mark.parametrize("merged", [False, True], ids=["low-rank", "merged"])


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_outputs_and_gradients_equal_peft(dora, merged):
    model = _peft_model(dora)
    model.train()  # dropout 0: train mode exercises the training path deterministically
    ids = torch.randint(0, 101, (2, 19))
    ref_out, ref_grads = _forward_backward(model, ids)
    assert apply_lean(model, merged=merged) == 14  # 7 linear layers x 2 blocks
    out, grads = _forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == (42 if dora else 28)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    remove_lean(model)
    torch.testing.assert_close(_forward_backward(model, ids)[0], ref_out)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_is_plain_peft_with_equal_outputs(dora, merged, tmp_path):
    model = _peft_model(dora)
    keys_before = set(model.state_dict())
    apply_lean(model, merged=merged)
    assert set(model.state_dict()) == keys_before  # same parameter names: only forward is replaced
    model.eval()
    ids = torch.randint(0, 101, (1, 23))
    with torch.no_grad():
        lean_out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(LlamaConfig(**CFG), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()  # plain peft: no llama-lora code involved
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, lean_out, atol=1e-5, rtol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, lean_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_path_matches_autograd_reference(dora):
    """With dropout: y = x W^T + s drop(x) A^T B^T, for DoRA times m / n with n detached (the paper's
    formula), against plain autograd with the same mask: output and every gradient."""
    torch.manual_seed(1)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(24, 16)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    m = (1 + 0.3 * torch.rand(24)).requires_grad_(dora)
    norm = torch.linalg.norm(w + 1.5 * b.detach() @ a.detach(), dim=1)
    g = torch.randn(37, 24)
    torch.manual_seed(7)
    y = lean_linear(x, w, None, a, b, m if dora else None, norm if dora else None, 1.5, 0.25)
    y.backward(g)
    leaves = [x, a, b] + ([m] if dora else [])
    got = [y.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)  # the same random draw gives the same mask
    keep, ks = _dropout_keep(x.detach(), 0.25)
    ref = x @ w.t() + 1.5 * ((torch.where(keep, x, 0) * ks) @ a.t()) @ b.t()
    if dora:
        ref = ref * (m / norm)
    ref.backward(g)
    for mine, theirs in zip(got, [ref.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
    # The mask drops ~p of the entries and the scale keeps the expectation.
    big, _ = _dropout_keep(torch.empty(400, 500), 0.05)
    assert abs(1 - big.float().mean().item() - 0.05) < 0.003
    assert ks == pytest.approx(1 / (1 - round(0.25 * 32768) / 32768))


def test_dora_norm_from_low_rank_products_tracks_training():
    model = _peft_model(dora=True)
    apply_lean(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]

    def direct():  # what PEFT computes: the norm of the materialised W + s B A
        return torch.linalg.norm(layer.base_layer.weight + scale * (b @ a), dim=1).detach()

    torch.testing.assert_close(_row_norm(layer, "default", layer.base_layer.weight, a, b, scale), direct())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    model(input_ids=torch.randint(0, 101, (1, 9))).logits.sum().backward()
    opt.step()  # A and B change in place: the cached norm must be recomputed
    torch.testing.assert_close(_row_norm(layer, "default", layer.base_layer.weight, a, b, scale), direct())


def test_bf16_autocast_matches_peft_within_bf16_precision():
    model = _peft_model(dora=True)
    ids = torch.randint(0, 101, (1, 15))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids).logits.float()
        apply_lean(model)
        out = model(input_ids=ids).logits.float()
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
    mag = model.base_model.model.model.layers[0].mlp.up_proj.lora_magnitude_vector["default"].weight
    assert mag.grad is not None and mag.grad.dtype == torch.float32 and torch.isfinite(mag.grad).all()


def test_disabled_adapter_falls_back_to_base_model():
    model = _peft_model(dora=False)
    apply_lean(model)
    ids = torch.randint(0, 101, (1, 11))
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    with torch.no_grad():
        base = model.get_base_model()
        remove_lean(model)
        with model.disable_adapter():
            ref = base(input_ids=ids).logits
    torch.testing.assert_close(off, ref)


@pytest.mark.parametrize("dropout,merged", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)],
                         ids=["shared", "dropout", "merged", "merged-dropout"])
def test_layers_reading_one_input_share_one_lora_a_matmul(dropout, merged, monkeypatch):
    """q/k/v and gate/up read the same tensor: without dropout their A matrices run as one matmul per
    block (4 per layer instead of 7), in the merged step as one autograd function per group; with
    dropout each layer draws its own mask, as in PEFT (and the merged step stands aside)."""
    from llama_lora import kernels

    model = _peft_model(dora=False, dropout=dropout)
    model.train()
    apply_lean(model, merged=merged)
    groups, fused, dropped = [], [], []
    real_group, real_fused, real_drop = kernels._group_lora_a, kernels._MergedLora.apply, kernels._DropoutLoraA.apply
    monkeypatch.setattr(kernels, "_group_lora_a", lambda x, a: groups.append(len(a)) or real_group(x, a))
    monkeypatch.setattr(kernels._MergedLora, "apply", lambda x, s, *t: fused.append(len(s)) or real_fused(x, s, *t))
    monkeypatch.setattr(kernels._DropoutLoraA, "apply", lambda *a: dropped.append(1) or real_drop(*a))
    _forward_backward(model, torch.randint(0, 101, (2, 19)))
    per_block = [] if dropout else [1, 1, 1, 1, 2, 2, 3, 3]  # o, down alone; gate/up; q/k/v (2 blocks)
    assert sorted(fused if merged else groups) == per_block and not (groups if merged else fused)
    assert len(dropped) == (14 if dropout else 0)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_shared_lora_a_under_gradient_checkpointing_equals_peft(dora, merged):
    """Checkpointing recomputes each block in backward with new tensors: the shared rank-r activations
    are recomputed, never reused from the first pass, so gradients equal PEFT's."""
    model = _peft_model(dora)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 101, (2, 19))
    ref_out, ref_grads = _forward_backward(model, ids)
    apply_lean(model, merged=merged)
    out, grads = _forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@MERGED
def test_shared_lora_a_leaves_nothing_behind_under_checkpointing(merged):
    """Checkpointing recomputes each block in backward and nothing back-propagates through that
    recomputed graph: a cached rank-r activation would keep its saved tensors (a whole layer's
    activations) alive until the next step. Every group's cache must be empty after a step."""
    model = _peft_model(dora=False)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    apply_lean(model, merged=merged)
    _forward_backward(model, torch.randint(0, 101, (2, 19)))
    groups = [m.__dict__["_lean_group"] for m in model.modules() if "_lean_group" in m.__dict__]
    assert len(groups) == 10  # q/k/v + gate/up, 2 blocks
    assert all(not shared for _, _, shared in groups)


def test_lean_auto_policy():
    """peft.lean=auto: lean on CPU, and DoRA everywhere; PEFT's forward for LoRA on a GPU (measured)."""
    from llama_lora.config.schema import PeftConfig
    from llama_lora.kernels import lean_enabled

    assert PeftConfig().lean == "auto"
    assert lean_enabled(PeftConfig(), "cpu") and lean_enabled(PeftConfig(method="dora"), "cuda")
    assert not lean_enabled(PeftConfig(), "cuda") and not lean_enabled(PeftConfig(), "mps")
    assert lean_enabled(PeftConfig(lean=True), "cuda") and not lean_enabled(PeftConfig(lean=False), "cpu")


def test_lean_merged_auto_policy():
    """peft.lean_merged=auto: on CPU only (its weight copy is not worth it on a GPU)."""
    from llama_lora.config.schema import PeftConfig
    from llama_lora.kernels import lean_merged_enabled

    assert PeftConfig().lean_merged == "auto"
    assert lean_merged_enabled(PeftConfig(), "cpu") and not lean_merged_enabled(PeftConfig(), "cuda")
    assert lean_merged_enabled(PeftConfig(lean_merged=True), "mps")
    assert not lean_merged_enabled(PeftConfig(lean_merged=False), "cpu")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_step_trains_like_peft(dora):
    """Three AdamW steps on different batches: the merged weights W + s B A (and DoRA's norm of them)
    must follow A and B as the optimizer changes them in place, so the parameters track PEFT's."""
    ref, lean = _peft_model(dora), _peft_model(dora)
    apply_lean(lean, merged=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (ref, lean)]
    q_proj = lean.base_model.model.model.layers[0].self_attn.q_proj
    for step in range(3):
        ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(step))
        for model, opt in zip((ref, lean), opts):
            model.train()
            _forward_backward(model, ids)
            opt.step()
        if step == 0:  # built in the first forward from A and B as they were then
            w, _ = q_proj.__dict__["_lean_merged_weight"][1]
            a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
            assert not torch.allclose(w, q_proj.base_layer.weight + q_proj.scaling["default"] * (b @ a))
    for (name, p), (_, q) in zip(ref.named_parameters(), lean.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=name)
    ids = torch.randint(0, 101, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lean_step_under_bf16_autocast_matches_peft(dora, merged):
    """The autocast path (bf16 weights, fp32 adapters, casts inside the lean step, shared A matmul) on
    CPU; tests/gpu runs the same comparison under CUDA autocast."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**CFG), dtype=torch.bfloat16)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 101, (2, 23))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, 101), ids.reshape(-1)).backward()
        return logits.float().detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = step()
    apply_lean(model, merged=merged)
    logits, grads = step()
    # bf16 would round the update s B A away in W + s B A: the merged step stands aside
    assert not any("_lean_merged_weight" in m.__dict__ for m in model.modules())
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == torch.float32 and rel(grads[name], ref_grads[name]) < 5e-2, name
