"""CUDA paths: PyTorch's FlashAttention varlen kernel for packed rows, the lean LoRA/DoRA step under bf16
autocast, the memory planner against the CUDA allocator, and the CLI end to end on a GPU.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with `pytest tests/gpu -v`.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_flash_varlen_matches_per_example_attention():
    from llama_lora.attention import flash_varlen, varlen_attention

    assert flash_varlen() is not None, "torch.nn.attention.varlen missing: packed rows would loop over examples"
    torch.manual_seed(0)
    lengths = [37, 120, 5, 250, 64]
    T, H, KV, D = sum(lengths), 8, 2, 64
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = varlen_attention(None, q, k, v, None, scaling=D**-0.5, position_ids=pos)
    assert out.shape == (1, T, H, D)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    # Reference: each example on its own, fp32, plain causal attention.
    ref, start = [], 0
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    for n in lengths:
        s = slice(start, start + n)
        ref.append(F.scaled_dot_product_attention(q32[:, :, s], k32[:, :, s], v32[:, :, s], is_causal=True,
                                                  enable_gqa=True, scale=D**-0.5))
        start += n
    ref = torch.cat(ref, dim=2).transpose(1, 2)
    ref.backward(g.float())
    assert _rel(out, ref) < 1e-2
    for got, want in zip(grads, (q32.grad, k32.grad, v32.grad)):
        assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lean_step_matches_peft_under_bf16_autocast(dora):
    from llama_lora import lean
    from llama_lora.attention import use_varlen_attention
    from tests.helpers import bf16_lean_model

    shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)

    def build(policy):
        return bf16_lean_model(shape, policy, dora, r=8, b_std=0.05, device="cuda")

    ref_model = build(None)
    model = build(lean.LeanPolicy(lean=True))
    model.load_state_dict(ref_model.state_dict())
    lengths = [60, 17, 140]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()

    def step(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, position_ids=pos).logits
            loss = F.cross_entropy(logits.float()[0, :-1], ids[0, 1:])
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = step(ref_model)  # PEFT's forward, transformers' SDPA with the packed mask
    assert use_varlen_attention(model)
    logits, grads = step(model)
    assert _rel(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert _rel(grads[name], ref_grads[name]) < 5e-2, name


def test_lean_dropout_on_cuda_matches_autograd_reference():
    """The CUDA dropout path (one native_dropout kernel): same RNG state -> same mask as a plain autograd
    reference, so outputs and all gradients must agree."""
    from llama_lora.lean.functions import lean_linear

    torch.manual_seed(0)
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(96, 64, device="cuda")
    a = torch.randn(8, 64, device="cuda", requires_grad=True)
    b = torch.randn(96, 8, device="cuda", requires_grad=True)
    g = torch.randn(300, 96, device="cuda")
    torch.cuda.manual_seed(123)
    out = lean_linear(x, w, None, a, b, None, None, 2.0, 0.25)
    out.backward(g)
    got = [out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
    x.grad = a.grad = b.grad = None
    torch.cuda.manual_seed(123)
    dropped, keep = torch.native_dropout(x, 0.25, True)
    assert 0.2 < 1 - keep.float().mean().item() < 0.3
    ref = x @ w.t() + 2.0 * (dropped @ a.t()) @ b.t()
    ref.backward(g)
    for mine, want in zip(got, [ref.detach(), x.grad, a.grad, b.grad]):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("overrides", [{}, {"peft.method": "dora"}, {"data.packing": False},
                                       {"model.gradient_checkpointing": True}],
                         ids=["lora-packed", "dora-packed", "lora-padded", "lora-checkpointing"])
def test_planner_predicts_cuda_peak_within_10_percent(overrides, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_lora import data as data_lib, lean, model as model_lib
    from llama_lora.adapter import apply_adapter
    from llama_lora.attention import use_varlen_attention
    from llama_lora.config.schema import Config
    from llama_lora.loss import response_loss_sum
    from llama_lora.planner import measure_peak_bytes, plan_memory

    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(mc).save_pretrained(tmp_path / "m")
    cfg = Config(model={"name_or_path": str(tmp_path / "m")}, training={"device": "cuda"})
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    runtime = model_lib.choose_runtime(cfg.training, cfg.model, model_lib.probe_capabilities())
    assert runtime.precision == "bf16" and runtime.model_dtype == torch.bfloat16
    policy = lean.decide(cfg.peft, runtime.device, runtime.precision)
    model = apply_adapter(model_lib.load_model(str(tmp_path / "m"), cfg.model, runtime), cfg.peft, lean=policy)
    if cfg.data.packing:
        assert use_varlen_attention(model)
    model.train()  # checkpointing and dropout (0.05 by default) act in train mode only
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    rng = random.Random(0)
    examples = []
    for n in [rng.randint(64, 512) for _ in range(4)]:
        ids = [rng.randrange(3, 32000) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    collate = data_lib.make_collate(cfg.data.packing, 0)
    batch = {k: v.cuda() for k, v in collate(examples).items()}

    def one_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = response_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # optimizer state exists from here on
    measured = measure_peak_bytes(one_step, model, opt)
    tokens = batch["input_ids"].numel()
    keep = int((batch["labels"][:, 1:] != -100).any(0).sum()) * batch["input_ids"].shape[0]
    plan = plan_memory(cfg, mc, "cuda", len(examples), tokens_per_micro_batch=tokens,
                       rows_per_micro_batch=batch["input_ids"].shape[0], loss_tokens_per_micro_batch=keep,
                       lean=policy)
    err = plan.tensor_bytes / measured - 1
    print(f"{overrides}: planned {plan.tensor_bytes / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({err:+.1%})")
    assert abs(err) < 0.10, plan.report()


@pytest.mark.slow
def test_train_eval_merge_on_cuda(tmp_path, embedded_model, embedded_data):
    from tests.helpers import run_cli

    run_cli("train", "experiment=quickstart", "training.max_steps=300", "training.eval_every=100",
            f"output_dir={tmp_path}", "run_name=gpu")
    run = tmp_path / "gpu"
    m = json.loads((run / "metrics.json").read_text())
    assert m["device"] == "cuda" and m["precision"] == "bf16", m
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"], m
    log = (run / "train.log").read_text()
    assert "fused AdamW" in log and "llama_lora_varlen" in log
    print("quickstart (300 steps) on CUDA:", {k: m[k] for k in ("eval_loss_before", "eval_loss", "tokens_per_second",
                                                               "peak_memory_mb", "train_time_s")})
    run_cli("eval", str(run))
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else None
    print("eval:", ev and {k: v for k, v in ev.items() if not isinstance(v, (list, dict))})
    run_cli("merge", str(run))
    merged = run / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))


@pytest.mark.slow
def test_default_micro_batch_is_the_planners_on_cuda(tmp_path, embedded_model, embedded_data):
    """training.micro_batch_size=auto (the schema default) on CUDA: the planner picks the micro-batch,
    the global batch (4 x accumulation) is kept, the choice is logged and config.yaml records it."""
    from llama_lora.config.load import load_config_file
    from tests.helpers import run_cli

    run_cli("train", "experiment=quickstart", "training.micro_batch_size=auto", "training.gradient_accumulation_steps=8",
            "training.max_steps=5", "training.eval_every=0", f"output_dir={tmp_path}", "run_name=auto")
    log = (tmp_path / "auto" / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "micro_batch_size=auto on CUDA: micro-batch" in ln)
    saved = load_config_file(tmp_path / "auto" / "config.yaml").training
    assert saved.micro_batch_size * saved.gradient_accumulation_steps == 32, line
    assert saved.micro_batch_size == 32, line  # 32 short embedded examples fit any GPU
    print(line)
