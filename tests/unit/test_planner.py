"""The memory planner: exact parameter arithmetic, how each term follows the configuration, prediction
vs a measured peak, budgets, and auto_batch_size keeping the global batch."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora import lean
from llama_lora.adapter import apply_adapter, count_parameters
from llama_lora.attention import use_varlen_attention
from llama_lora.config.schema import Config
from llama_lora.data import IGNORE_INDEX, make_collate
from llama_lora.errors import LlamaLoraError
from llama_lora.loss import response_loss_sum
from llama_lora.planner import auto_batch_size, measure_peak_bytes, plan_memory

LLAMA_32_1B = LlamaConfig(  # meta-llama/Llama-3.2-1B's published config.json
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
)
SMALL = dict(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)


def _cfg(**sections) -> Config:
    return Config.model_validate({"model": {"name_or_path": "x"}, **sections})


def test_parameter_arithmetic_is_exact():
    plan = plan_memory(_cfg(), LLAMA_32_1B, "cuda")
    assert plan.breakdown["weights"] == 1_235_814_400 * 2  # tied head counted once, bf16 on CUDA
    # LoRA r=16 on all 7 linear layers of 16 blocks: r * (in + out) each.
    per_block = 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)
    assert plan.breakdown["adapter"] == plan.breakdown["gradients"] == 16 * per_block * 4
    assert plan.breakdown["optimizer"] == 2 * plan.breakdown["adapter"]  # AdamW's two fp32 moments

    # ...and what PEFT really creates on a small model, LoRA and DoRA (magnitude vectors).
    for method in ("lora", "dora"):
        cfg = _cfg(peft={"method": method, "target_modules": ["q_proj", "v_proj", "down_proj"]})
        model = apply_adapter(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)), cfg.peft)
        trainable, total = count_parameters(model)
        plan = plan_memory(cfg, LlamaConfig(**SMALL), "cpu")
        assert plan.breakdown["adapter"] == 4 * trainable
        assert plan.breakdown["weights"] == 4 * (total - trainable)


def test_terms_follow_the_configuration():
    base = plan_memory(_cfg(), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024)
    assert base.breakdown["weights"] == 1_235_814_400 * 4  # fp32 on CPU
    double = plan_memory(_cfg(), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=2048)
    assert double.breakdown["activations"] == pytest.approx(2 * base.breakdown["activations"], rel=1e-6)
    ckpt = plan_memory(_cfg(model={"name_or_path": "x", "gradient_checkpointing": True}), LLAMA_32_1B, "cpu", 4,
                       tokens_per_micro_batch=1024)
    # Checkpointing keeps one layer input per layer (+ one layer's internals), not every layer's activations.
    assert ckpt.breakdown["activations"] < 0.1 * base.breakdown["activations"]
    assert ckpt.total_bytes < base.total_bytes - 0.9 * base.breakdown["activations"]
    peft_dropout = plan_memory(_cfg(peft={"lean": False, "dropout": 0.05}), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024)
    assert peft_dropout.breakdown["activations"] > 1.2 * base.breakdown["activations"]
    dora = plan_memory(_cfg(peft={"method": "dora"}), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024)
    assert base.total_bytes < dora.total_bytes < 1.15 * base.total_bytes
    # The loss over a 128k vocabulary unchunked: 12 bytes per kept logit (log-softmax + two gradients, fp32);
    # chunked (the default from a 32k vocabulary on, tests/unit/test_chunked_loss.py) far less.
    unchunked = plan_memory(_cfg(training={"loss_chunk_size": 0}), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024)
    assert unchunked.breakdown["logits/loss"] == 1024 * 128256 * 12 > base.breakdown["logits/loss"]
    # The merged step keeps W + s B A of each adapted layer in fp32 (on CPU, fp32, without dropout only).
    assert base.breakdown["merged weights"] == 16 * (2048 * 2048 * 2 + 2048 * 512 * 2 + 2048 * 8192 * 3) * 4
    for off in (_cfg(peft={"lean_merged": False}), _cfg(peft={"dropout": 0.05}), _cfg(training={"precision": "bf16"})):
        assert plan_memory(off, LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024).breakdown["merged weights"] == 0
    assert plan_memory(_cfg(), LLAMA_32_1B, "cuda", 4, tokens_per_micro_batch=1024).breakdown["merged weights"] == 0
    # The planner reads the run's policy when given one: sharded (FSDP/DeepSpeed) runs PEFT's forward.
    sharded = lean.decide(_cfg().peft, "cpu", "fp32", sharded=True)
    assert plan_memory(_cfg(), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024,
                       lean=sharded).breakdown["merged weights"] == 0
    # Without token counts the worst case is planned: every example at data.max_seq_length.
    worst = plan_memory(_cfg(data={"max_seq_length": 256}), LLAMA_32_1B, "cpu", 2)
    assert worst.tokens_per_micro_batch == 512 and "worst case" in worst.report()


def _examples(n, lo, hi, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, SMALL["vocab_size"]) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:]})
    return out


@pytest.mark.parametrize("overrides", [
    {},
    {"peft": {"method": "dora"}},
    {"data": {"packing": False}},
    {"peft": {"lean_merged": False}},
], ids=["lora-packed", "dora-packed", "lora-padded", "lora-packed-low-rank"])
def test_prediction_within_10_percent_of_measured_peak(overrides):
    """One real training step (fp32 CPU) measured with PyTorch's profiler vs the plan's tensor total."""
    cfg = _cfg(**overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL), attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    policy = lean.decide(cfg.peft, "cpu", "fp32")
    model = apply_adapter(model, cfg.peft, lean=policy)
    if cfg.data.packing:
        use_varlen_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    collate = make_collate(cfg.data.packing, 0)
    batch_examples = _examples(4, 100, 220)
    model.train()

    def step():
        loss, n = response_loss_sum(model, collate(batch_examples))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as between accumulation steps

    step()
    measured = measure_peak_bytes(step, model, opt)
    lengths = [len(e["input_ids"]) for e in batch_examples]
    tokens = sum(lengths) if cfg.data.packing else 4 * max(lengths)
    keep = sum(n - n // 2 for n in lengths) if cfg.data.packing else 4 * (max(lengths) - min(n // 2 for n in lengths))
    plan = plan_memory(cfg, LlamaConfig(**SMALL), "cpu", 4, tokens_per_micro_batch=tokens,
                       rows_per_micro_batch=1 if cfg.data.packing else 4, loss_tokens_per_micro_batch=keep,
                       lean=policy)
    assert abs(plan.tensor_bytes / measured - 1) < 0.10, (plan.report(), measured)


def test_budget_decides_fits_and_report():
    cfg = _cfg(training={"memory_budget_gb": 1.0})
    plan = plan_memory(cfg, LLAMA_32_1B, "cpu", 8)
    assert plan.available_bytes == 2**30 and not plan.fits
    text = plan.report()
    assert "does NOT fit" in text and "activations" in text and "weights" in text
    roomy = plan_memory(_cfg(training={"memory_budget_gb": 4096.0}), LLAMA_32_1B, "cpu", 1)
    assert roomy.fits and "fits" in roomy.report()


def test_auto_batch_size_keeps_the_global_batch():
    lengths = [random.Random(i).randint(50, 300) for i in range(64)]
    base = _cfg(training={"micro_batch_size": 4, "gradient_accumulation_steps": 4})

    def plan_for(b):
        tokens = sum(sorted(lengths, reverse=True)[:b])
        return plan_memory(base, LLAMA_32_1B, "cpu", b, tokens_per_micro_batch=tokens, rows_per_micro_batch=1,
                           loss_tokens_per_micro_batch=tokens)

    for fit, expected in ((5, 4), (9, 8), (16, 16), (1, 1)):
        # A budget just above the plan for `fit` examples: the micro-batch is the largest divisor of 16 <= fit.
        budget = (plan_for(fit).total_bytes + 1024) / 2**30
        cfg = base.model_copy(update={"training": base.training.model_copy(update={"memory_budget_gb": budget})})
        micro, accum, plan = auto_batch_size(cfg, LLAMA_32_1B, "cpu", lengths)
        assert (micro, accum) == (expected, 16 // expected) and plan.fits
    tight = base.model_copy(update={"training": base.training.model_copy(update={"memory_budget_gb": 0.5})})
    with pytest.raises(LlamaLoraError, match="Even a micro-batch of 1.*gradient_checkpointing"):
        auto_batch_size(tight, LLAMA_32_1B, "cpu", lengths)


def test_batch_split_fills_the_gpu_by_default_and_honours_an_explicit_micro_batch():
    """training.micro_batch_size=auto (the default): on CUDA the planner's micro-batch, the global batch
    (4 x accumulation) kept; elsewhere 4; an explicit number is used as given on CUDA too. Devices are
    named, not probed, as in the device matrix tests: this runs on CPU."""
    from llama_lora.planner import batch_split

    lengths = [random.Random(i).randint(50, 300) for i in range(64)]
    roomy = {"memory_budget_gb": 4096.0}
    cfg = _cfg(training=roomy)
    assert cfg.training.micro_batch_size == "auto" and cfg.training.gradient_accumulation_steps == 4

    on_cpu, line = batch_split(cfg, LLAMA_32_1B, "cpu", lengths)
    assert (on_cpu.training.micro_batch_size, on_cpu.training.gradient_accumulation_steps, line) == (4, 4, None)

    on_gpu, line = batch_split(cfg, LLAMA_32_1B, "cuda", lengths)
    assert (on_gpu.training.micro_batch_size, on_gpu.training.gradient_accumulation_steps) == (16, 1)
    assert "training.micro_batch_size=auto on CUDA: micro-batch 16 x 1 accumulation (configured 4 x 4)" in line

    # A budget that fits 5 but not 8 examples per forward: the largest divisor of the global batch 16.
    def plan_for(b):
        tokens = sum(sorted(lengths, reverse=True)[:b])
        return plan_memory(cfg, LLAMA_32_1B, "cuda", b, tokens_per_micro_batch=tokens, rows_per_micro_batch=1,
                           loss_tokens_per_micro_batch=tokens)

    tight = _cfg(training={"memory_budget_gb": (plan_for(5).total_bytes + 1024) / 2**30})
    split, _ = batch_split(tight, LLAMA_32_1B, "cuda", lengths)
    assert (split.training.micro_batch_size, split.training.gradient_accumulation_steps) == (4, 4)

    explicit = _cfg(training={**roomy, "micro_batch_size": 2, "gradient_accumulation_steps": 3})
    kept, line = batch_split(explicit, LLAMA_32_1B, "cuda", lengths)
    assert kept is explicit and line is None  # the user's micro-batch, untouched
    asked = _cfg(training={**roomy, "micro_batch_size": 2, "gradient_accumulation_steps": 8, "auto_batch_size": True})
    split, line = batch_split(asked, LLAMA_32_1B, "cpu", lengths)
    assert (split.training.micro_batch_size, split.training.gradient_accumulation_steps) == (16, 1)
    assert line.startswith("training.auto_batch_size: micro-batch 16 x 1 accumulation (configured 2 x 8)")


def test_micro_batch_size_accepts_a_number_or_auto_only():
    from llama_lora.errors import LlamaLoraError
    from llama_lora.config.load import load_config

    assert load_config(["training.micro_batch_size=8"]).training.micro_batch_size == 8
    for bad in ("training.micro_batch_size=0", "training.micro_batch_size=max"):
        with pytest.raises(LlamaLoraError, match="training.micro_batch_size"):
            load_config([bad])


def test_one_plan_decides_the_run_and_the_planner_reads_it():
    """plan.plan_run decides runtime, step policy and loss chunking once; the planner sums memory of exactly
    that plan (a bf16 plan halves the activations), and a sharded plan keeps one cross-entropy and PEFT's
    forward. The runtime is chosen nowhere else in the package but for inference (runs.inference_runtime)."""
    import re
    from pathlib import Path

    from llama_lora.model import Capabilities
    from llama_lora.plan import PlanError, plan_for_device, plan_run

    cpu = Capabilities(glibc=True)
    fp32 = plan_run(_cfg(), cpu)
    bf16 = plan_run(_cfg(training={"precision": "bf16"}), cpu)
    assert fp32.lean.lean and fp32.loss_chunk(128256) > 0 and fp32.runtime.malloc == "keep"
    same = plan_memory(_cfg(), LLAMA_32_1B, fp32, 4, tokens_per_micro_batch=1024)
    assert same.breakdown == plan_memory(_cfg(), LLAMA_32_1B, "cpu", 4, tokens_per_micro_batch=1024).breakdown
    half = plan_memory(_cfg(training={"precision": "bf16"}), LLAMA_32_1B, bf16, 4, tokens_per_micro_batch=1024)
    assert half.breakdown["activations"] * 2 == pytest.approx(same.breakdown["activations"], rel=0.05)
    sharded = plan_run(_cfg(training={"device": "cuda"}), Capabilities(cuda=True, cuda_device_count=2, cuda_bf16=True,
                                                                       cuda_capability=(9, 0)), sharded=True)
    assert sharded.loss_chunk(128256) == 0 and not sharded.lean.lean
    with pytest.raises(PlanError) as e:
        plan_run(_cfg(model={"name_or_path": "x", "quantization": "nf4"}), cpu, sharded=True)
    assert e.value.part == "device" and "FSDP or DeepSpeed" in str(e.value)
    with pytest.raises(PlanError) as e:
        plan_run(_cfg(peft={"init": "pissa"}), cpu, sharded=True)
    assert e.value.part == "training step"
    assert plan_for_device(_cfg(), "cuda").runtime.precision == "bf16"

    src = Path(__file__).resolve().parents[2] / "src" / "llama_lora"
    callers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "_vendor" not in p.parts
                     and re.search(r"\bchoose_runtime\(", p.read_text()) and p.name != "model.py")
    assert callers == ["plan.py", "runs.py"], callers
