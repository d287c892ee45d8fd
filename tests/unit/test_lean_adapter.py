"""The lean LoRA/DoRA step computes what PEFT computes (outputs and gradients, fp32), saves standard PEFT
files that plain peft loads with equal outputs, keeps DoRA's norm right as the adapter trains, and its
policy (llama_lora.lean.decide) says what really runs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora import lean
from llama_lora.config.schema import PeftConfig
from llama_lora.lean import LeanLinear, LeanPolicy, functions, native
from llama_lora.lean.functions import dropout_keep, lean_linear
from tests.helpers import LEAN_CFG, bf16_lean_model, forward_backward, tiny_peft_model

LOW_RANK, MERGED_POLICY = LeanPolicy(lean=True), LeanPolicy(lean=True, merged=True)
MERGED = pytest.mark.parametrize("merged", [False, True], ids=["low-rank", "merged"])


def _policy(merged: bool) -> LeanPolicy:
    return MERGED_POLICY if merged else LOW_RANK


def _pair(dora: bool, merged: bool, **kwargs):
    """(PEFT's model, the lean one) with the same parameters."""
    ref = tiny_peft_model(dora, **kwargs)
    model = tiny_peft_model(dora, lean=_policy(merged), **kwargs)
    assert set(model.state_dict()) == set(ref.state_dict())  # PEFT's names: LeanLinear adds no state
    model.load_state_dict(ref.state_dict())
    return ref, model


def _assert_grads_equal(grads, ref_grads, n=None):
    assert grads.keys() == ref_grads.keys() and (n is None or len(grads) == n)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_outputs_and_gradients_equal_peft(dora, merged):
    ref, model = _pair(dora, merged)
    assert not any(isinstance(m, LeanLinear) for m in ref.modules())
    assert len(lean.lean_layers(model)) == 14  # 7 linear layers x 2 blocks
    ref.train(), model.train()  # dropout 0: train mode exercises the training path deterministically
    ids = torch.randint(0, 101, (2, 19))
    ref_out, ref_grads = forward_backward(ref, ids)
    out, grads = forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    _assert_grads_equal(grads, ref_grads, 42 if dora else 28)
    assert all(m.holds_merged_weight == merged for m in lean.lean_layers(model))


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_is_plain_peft_with_equal_outputs(dora, merged, tmp_path):
    ref, model = _pair(dora, merged)
    model.eval()
    ids = torch.randint(0, 101, (1, 23))
    with torch.no_grad():
        lean_out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "lean")
    ref.save_pretrained(tmp_path / "peft")
    # The standard adapter: the same config file as PEFT's own layers write (no _custom_modules) and the
    # same tensors under the same names.
    saved = (tmp_path / "lean" / "adapter_config.json").read_text()
    assert json.loads(saved) == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "custom" not in saved.lower() and "Lean" not in saved
    from safetensors.torch import load_file

    mine, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lean", "peft"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(LlamaConfig(**LEAN_CFG), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "lean").eval()  # plain peft: no llama-lora code
    assert not any(isinstance(m, LeanLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, lean_out, atol=1e-5, rtol=1e-5)
        merged_model = loaded.merge_and_unload()
        torch.testing.assert_close(merged_model(input_ids=ids).logits, lean_out, atol=1e-4, rtol=1e-4)


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
    keep, ks = dropout_keep(x.detach(), 0.25)
    ref = x @ w.t() + 1.5 * ((torch.where(keep, x, 0) * ks) @ a.t()) @ b.t()
    if dora:
        ref = ref * (m / norm)
    ref.backward(g)
    for mine, theirs in zip(got, [ref.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)
    # The mask drops ~p of the entries and the scale keeps the expectation.
    big, _ = dropout_keep(torch.empty(400, 500), 0.05)
    assert abs(1 - big.float().mean().item() - 0.05) < 0.003
    assert ks == pytest.approx(1 / (1 - round(0.25 * 32768) / 32768))


def test_dora_norm_from_low_rank_products_tracks_training():
    model = tiny_peft_model(dora=True, lean=LOW_RANK)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LeanLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]

    def direct():  # what PEFT computes: the norm of the materialised W + s B A
        return torch.linalg.norm(layer.base_layer.weight + scale * (b @ a), dim=1).detach()

    torch.testing.assert_close(layer.row_norm("default"), direct())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    model(input_ids=torch.randint(0, 101, (1, 9))).logits.sum().backward()
    opt.step()  # A and B change in place: the cached norm must be recomputed
    torch.testing.assert_close(layer.row_norm("default"), direct())


def test_bf16_autocast_matches_peft_within_bf16_precision():
    ref, model = _pair(dora=True, merged=False)
    ids = torch.randint(0, 101, (1, 15))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(input_ids=ids).logits.float()
        out = model(input_ids=ids).logits.float()
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
    mag = model.base_model.model.model.layers[0].mlp.up_proj.lora_magnitude_vector["default"].weight
    assert mag.grad is not None and mag.grad.dtype == torch.float32 and torch.isfinite(mag.grad).all()


def test_disabled_adapter_falls_back_to_base_model():
    ref, model = _pair(dora=False, merged=True)
    ids = torch.randint(0, 101, (1, 11))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        with ref.disable_adapter():
            expected = ref(input_ids=ids).logits
        on = model(input_ids=ids).logits
    torch.testing.assert_close(off, expected)
    assert not torch.allclose(on, off)  # and enabled again afterwards


@pytest.mark.parametrize("dropout,merged", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)],
                         ids=["shared", "dropout", "merged", "merged-dropout"])
def test_layers_reading_one_input_share_one_lora_a_matmul(dropout, merged, monkeypatch):
    """q/k/v and gate/up read the same tensor: without dropout their A matrices run as one matmul per
    block (4 per layer instead of 7), in the merged step as one autograd function per group; with
    dropout each layer draws its own mask, as in PEFT (and the merged step stands aside)."""
    model = tiny_peft_model(dora=False, dropout=dropout, lean=_policy(merged))
    model.train()
    groups, fused, dropped = [], [], []
    real_group, real_fused, real_drop = functions.group_lora_a, functions.MergedLora.apply, functions.DropoutLoraA.apply
    monkeypatch.setattr(functions, "group_lora_a", lambda x, a: groups.append(len(a)) or real_group(x, a))
    monkeypatch.setattr(functions.MergedLora, "apply", lambda x, s, *t: fused.append(len(s)) or real_fused(x, s, *t))
    monkeypatch.setattr(functions.DropoutLoraA, "apply", lambda *a: dropped.append(1) or real_drop(*a))
    forward_backward(model, torch.randint(0, 101, (2, 19)))
    per_block = [] if dropout else [1, 1, 1, 1, 2, 2, 3, 3]  # o, down alone; gate/up; q/k/v (2 blocks)
    assert sorted(fused if merged else groups) == per_block and not (groups if merged else fused)
    assert len(dropped) == (14 if dropout else 0)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_shared_lora_a_under_gradient_checkpointing_equals_peft(dora, merged):
    """Checkpointing recomputes each block in backward with new tensors: the shared rank-r activations
    are recomputed, never reused from the first pass, so gradients equal PEFT's."""
    ref, model = _pair(dora, merged, checkpointing=True)
    ref.train(), model.train()
    ids = torch.randint(0, 101, (2, 19))
    ref_out, ref_grads = forward_backward(ref, ids)
    out, grads = forward_backward(model, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    _assert_grads_equal(grads, ref_grads)


@MERGED
def test_shared_lora_a_leaves_nothing_behind_under_checkpointing(merged):
    """Checkpointing recomputes each block in backward and nothing back-propagates through that
    recomputed graph: a cached rank-r activation would keep its saved tensors (a whole layer's
    activations) alive until the next step. Every group's cache must be empty after a step."""
    model = tiny_peft_model(dora=False, lean=_policy(merged), checkpointing=True)
    model.train()
    forward_backward(model, torch.randint(0, 101, (2, 19)))
    grouped = [m for m in lean.lean_layers(model) if m.lean_group is not None]
    assert len(grouped) == 10  # q/k/v + gate/up, 2 blocks
    assert len({id(m.lean_group) for m in grouped}) == 4
    assert all(m.lean_group.empty for m in grouped)


# ----------------------------------------------------------------------------------------------------
# The policy: decided once, and what it says runs.


def test_lean_auto_policy():
    """peft.lean=auto: lean on CPU, and DoRA everywhere; PEFT's forward for LoRA on a GPU (measured), and
    under FSDP/DeepSpeed."""
    assert PeftConfig().lean == "auto"
    assert lean.decide(PeftConfig(), "cpu", "fp32").lean
    assert lean.decide(PeftConfig(method="dora"), "cuda", "bf16").lean
    assert not lean.decide(PeftConfig(), "cuda", "bf16").lean
    assert not lean.decide(PeftConfig(), "mps", "fp32").lean
    assert lean.decide(PeftConfig(lean=True), "cuda:0", "bf16").lean
    assert not lean.decide(PeftConfig(lean=False), "cpu", "fp32").lean
    sharded = lean.decide(PeftConfig(lean=True, method="dora"), "cuda", "bf16", sharded=True)
    assert sharded == LeanPolicy(False) and "FSDP/DeepSpeed" in sharded.describe()
    gpu_lora = lean.decide(PeftConfig(), "cuda", "bf16")
    assert gpu_lora.describe() == "PEFT's own LoRA forward (peft.lean=auto: LoRA on cuda)"


def test_lean_merged_policy_only_where_it_takes_effect():
    """peft.lean_merged=auto: on CPU only (its weight copy is not worth it on a GPU); any setting: only in
    fp32 without dropout, and only in the lean step."""
    assert PeftConfig().lean_merged == "auto"
    assert lean.decide(PeftConfig(), "cpu", "fp32").merged
    assert not lean.decide(PeftConfig(lean=True), "cuda", "fp32").merged
    assert lean.decide(PeftConfig(lean=True, lean_merged=True), "mps", "fp32").merged
    for cfg, precision, why in ((PeftConfig(lean_merged=False), "fp32", "peft.lean_merged=false"),
                                (PeftConfig(dropout=0.05), "fp32", "dropout 0.05 > 0"),
                                (PeftConfig(lean_merged=True), "bf16", "bf16"),
                                (PeftConfig(lean=False, lean_merged=True), "fp32", "peft.lean=false")):
        policy = lean.decide(cfg, "cpu", precision)
        assert not policy.merged and not policy.kernel and why in policy.describe(), policy.describe()


def test_lean_kernel_policy_only_where_it_takes_effect():
    built = native.load() is not None
    assert lean.decide(PeftConfig(r=16), "cpu", "fp32").kernel == built
    assert lean.decide(PeftConfig(r=64), "cpu", "fp32").kernel == built
    for cfg, why in ((PeftConfig(r=8), "r=8 is not a multiple of 16"), (PeftConfig(r=80), "r=80 is above 64"),
                     (PeftConfig(lean_kernel=False), "peft.lean_kernel=false")):
        policy = lean.decide(cfg, "cpu", "fp32")
        assert policy.merged and not policy.kernel
        assert policy.describe().endswith(f"rank-r products by BLAS ({why})"), policy.describe()
    assert not lean.decide(PeftConfig(lean=True, lean_merged=True, lean_kernel=True), "cuda", "fp32").kernel
    assert not lean.decide(PeftConfig(dropout=0.1, lean_kernel=True), "cpu", "fp32").kernel
    with pytest.raises(ValueError):
        LeanPolicy(lean=True, merged=False, kernel=True)


@pytest.mark.parametrize("r,dropout,precision", [(8, 0.0, "fp32"), (16, 0.0, "fp32"), (16, 0.1, "fp32"),
                                                 (16, 0.0, "bf16")],
                         ids=["r8-blas", "r16-kernel", "dropout-low-rank", "bf16-low-rank"])
def test_describe_matches_what_runs(r, dropout, precision, monkeypatch, caplog):
    """apply_adapter with a decided policy: LeanLinear layers, the one log line is describe(), and the step
    does what it says: merged weights held or not, the rank-r products in the kernel or not."""
    policy = lean.decide(PeftConfig(r=r, dropout=dropout), "cpu", precision)
    text = policy.describe()
    calls = []
    real = native.call_kernel
    monkeypatch.setattr(native, "call_kernel", lambda *a: calls.append(a[4]) or real(*a))
    with caplog.at_level(logging.INFO, logger="llama_lora.adapter"):
        model = tiny_peft_model(dora=False, dropout=dropout, r=r, lean=policy,
                                dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    assert f"Training step: {text}; 14 adapted layers run it." in caplog.text
    layers = lean.lean_layers(model)
    assert len(layers) == 14 and all(isinstance(m, LeanLinear) for m in layers)
    model.train()
    ids = torch.randint(0, 101, (2, 19))
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward_backward(model, ids)
    else:
        forward_backward(model, ids)
    merged = "merged fp32 weights" in text
    assert merged == policy.merged and all(m.holds_merged_weight == merged for m in layers)
    kernel = "llama-lora's CPU kernel" in text
    assert kernel == policy.kernel and bool(calls) == kernel
    if r == 8:
        assert text == "lean LoRA step, merged fp32 weights, rank-r products by BLAS (r=8 is not a multiple of 16)"
    elif dropout:
        assert "low-rank" in text and "dropout 0.1" in text
    elif precision == "bf16":
        assert "low-rank" in text and "bf16" in text
    else:
        assert kernel == (native.load() is not None)


def test_apply_adapter_without_policy_is_plain_peft(caplog):
    """No policy (inference, merge) or a policy that says PEFT: PEFT's own layers; lora_config() (TRL's
    bench rows) never registers anything."""
    from llama_lora.adapter import lora_config

    assert lora_config(PeftConfig())._custom_modules is None
    for policy in (None, LeanPolicy(False, lean_reason="peft.lean=false")):
        with caplog.at_level(logging.INFO, logger="llama_lora.adapter"):
            model = tiny_peft_model(dora=False, lean=policy)
        assert not any(isinstance(m, LeanLinear) for m in model.modules())
        assert model.peft_config["default"]._custom_modules is None
    assert "Training step: PEFT's own LoRA forward (peft.lean=false)." in caplog.text


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_step_trains_like_peft(dora):
    """Three AdamW steps on different batches: the merged weights W + s B A (and DoRA's norm of them)
    must follow A and B as the optimizer changes them in place, so the parameters track PEFT's."""
    ref, model = _pair(dora, merged=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (ref, model)]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    for step in range(3):
        ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(step))
        for m, opt in zip((ref, model), opts):
            m.train()
            forward_backward(m, ids)
            if m is model and step == 0:
                built, _ = q_proj.merged_weight("default")  # the one the first forward built (a cache hit)
            opt.step()
        if step == 0:  # A and B changed in place: a new merged weight, from them as they are now
            w, _ = q_proj.merged_weight("default")
            a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
            torch.testing.assert_close(w, q_proj.base_layer.weight + q_proj.scaling["default"] * (b @ a))
            assert w is not built and not torch.allclose(w, built)
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=name)
    ids = torch.randint(0, 101, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@MERGED
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lean_step_under_bf16_autocast_matches_peft(dora, merged):
    """The autocast path (bf16 weights, fp32 adapters, casts inside the lean step, shared A matmul) on
    CPU; tests/gpu runs the same comparison under CUDA autocast (tests.helpers.bf16_lean_model)."""

    def build(policy):
        return bf16_lean_model(LEAN_CFG, policy, dora, r=4, b_std=0.1)

    ids = torch.randint(0, 101, (2, 23))

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, 101), ids.reshape(-1)).backward()
        return logits.float().detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = step(build(None))
    model = build(_policy(merged))
    logits, grads = step(model)
    # bf16 would round the update s B A away in W + s B A: the merged step stands aside
    assert not any(m.holds_merged_weight for m in lean.lean_layers(model))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == torch.float32 and rel(grads[name], ref_grads[name]) < 5e-2, name
