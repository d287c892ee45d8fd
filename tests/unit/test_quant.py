"""Quantized bases (model.quantization, issue 15) with real bitsandbytes on CPU: llama-lora's QLoRA equals
plain PEFT QLoRA (outputs and gradients), the lean step steps aside and says why, the planner counts the
packed storage and its statistics as bitsandbytes lays them out, and the refusals (no bitsandbytes, MPS,
peft.lean=true, FSDP/DeepSpeed, a quantized merge output) are one paragraph, exit 2, nothing written."""

from __future__ import annotations

import sys

import pytest
import torch

from llama_lora import cli, lean, model as model_lib
from llama_lora.config.schema import Config, ModelConfig, PeftConfig, TrainingConfig
from llama_lora.errors import LlamaLoraError
from tests.helpers import error_paragraph, forward_backward, make_run

pytest.importorskip("bitsandbytes")


def _runtime(quantization: str, precision: str = "fp32") -> model_lib.Runtime:
    rt = model_lib.choose_runtime(TrainingConfig(device="cpu", precision=precision),
                                  ModelConfig(quantization=quantization), model_lib.Capabilities())
    return rt


def _randomize_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("quantization,method", [("nf4", "lora"), ("nf4", "dora"), ("int8", "lora")])
def test_qlora_equals_plain_peft_qlora(tiny_base, quantization, method):
    """llama-lora's loader + preparation + adapter vs transformers + PEFT's prepare_model_for_kbit_training +
    get_peft_model on the same quantized base: the same outputs and adapter gradients, to the bit."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from llama_lora.adapter import apply_adapter

    peft_cfg = PeftConfig(method=method, r=4, alpha=8)
    rt = _runtime(quantization)
    policy = lean.decide(peft_cfg, "cpu", rt.precision, quantization=quantization)
    assert not policy.lean and f"model.quantization={quantization}" in policy.describe()
    torch.manual_seed(0)
    ours = apply_adapter(model_lib.load_model(str(tiny_base), ModelConfig(quantization=quantization), rt), peft_cfg,
                         lean=policy)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=model_lib.bnb_config(quantization, "fp32"))
    plain.config.use_cache = False
    plain = get_peft_model(prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora",
                                      task_type="CAUSAL_LM"))
    bnb_layer = "Linear4bit" if quantization != "int8" else "Linear8bitLt"
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == bnb_layer and type(q_proj.base_layer).__name__ == bnb_layer  # PEFT's bnb LoRA
    assert type(ours.base_model.model.lm_head).__name__ == "Linear"  # the head is not quantized
    for m in (ours, plain):
        _randomize_b(m)
        m.train()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    out_a, grads_a = forward_backward(ours, ids)
    out_b, grads_b = forward_backward(plain, ids)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 14 * (3 if method == "dora" else 2)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=0, atol=0, msg=k)
    assert all(float(g.abs().max()) > 0 for k, g in grads_a.items() if "lora_A" in k)  # the adapter trains


def test_bf16_preparation_keeps_embeddings_in_bf16_and_norms_in_fp32(tiny_base):
    rt = _runtime("nf4", "bf16")
    m = model_lib.load_model(str(tiny_base), ModelConfig(quantization="nf4", gradient_checkpointing=True), rt)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16  # PEFT's preparation would make it fp32
    assert m.model.norm.weight.dtype == torch.float32 and m.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in m.parameters())
    assert m.is_gradient_checkpointing
    assert m.model.layers[0].mlp.down_proj.compute_dtype == torch.bfloat16  # compute dtype follows the precision
    assert "nf4 bitsandbytes 4-bit, double quantization, compute bfloat16" in rt.reason


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_planner_counts_quantized_storage_and_statistics(tiny_base, quantization):
    """The planner's weights + statistics equal the bytes the loaded quantized model holds (within the
    rotary buffer), and 4-bit is ~half a byte per quantized weight, int8 one byte."""
    from transformers import AutoConfig

    from llama_lora.planner import plan_memory, resident_bytes

    cfg = Config(model={"name_or_path": str(tiny_base), "quantization": quantization})
    model = model_lib.load_model(str(tiny_base), cfg.model, _runtime(quantization))
    conf = AutoConfig.from_pretrained(tiny_base)
    plan = plan_memory(cfg, conf, "cpu", 1)
    planned = plan.breakdown["weights"] + plan.breakdown["quant stats"]
    assert abs(planned - resident_bytes(model)) <= 1024, (planned, resident_bytes(model))
    full = plan_memory(Config(model={"name_or_path": str(tiny_base)}), conf, "cpu", 1).breakdown["weights"]
    n_linear = sum(m.in_features * m.out_features for m in model.modules()
                   if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    assert full - plan.breakdown["weights"] == n_linear * (4 - (0.5 if quantization == "nf4" else 1))
    assert plan.breakdown["merged weights"] == 0  # the lean (merged) step steps aside
    assert f"quantized to {quantization}" in plan.notes[0]


def test_dequantize_after_eval_forward_matches_the_quantized_weights(tiny_base):
    """Eval computes as training does (no lossy repacking for bitsandbytes' bf16 CPU kernel), and the
    dequantized model computes exactly what the quantized one did (transformers' dequantize did not)."""
    rt = _runtime("nf4")
    m = model_lib.load_model(str(tiny_base), ModelConfig(quantization="nf4"), rt, training=False).eval()
    layer = m.model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.train()
        want = layer(x)  # training-mode path, before any repacking: dequantize_4bit + matmul in fp32
        layer.eval()
        m(input_ids=torch.tensor([[1, 2, 3]]))  # eval forward (bitsandbytes would repack on AVX512-BF16)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        model_lib.dequantize_model(m, torch.float32)
        got = m.model.layers[0].mlp.up_proj(x)
    assert type(m.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not hasattr(m.config, "quantization_config")  # a save of it is a plain model


# ---- decisions and refusals


def test_mps_missing_bitsandbytes_and_sharding_are_refused_with_what_to_do():
    with pytest.raises(LlamaLoraError, match="no Apple MPS backend.*model.quantization=none"):
        model_lib.choose_runtime(TrainingConfig(device="mps"), ModelConfig(quantization="nf4"),
                                 model_lib.Capabilities(mps=True, bitsandbytes=True))
    with pytest.raises(LlamaLoraError, match=r"pip install 'llama-lora\[quant\]'"):
        model_lib.choose_runtime(TrainingConfig(device="cpu"), ModelConfig(quantization="int8"),
                                 model_lib.Capabilities(bitsandbytes=False))
    model_lib.choose_runtime(TrainingConfig(device="cpu"), ModelConfig(), model_lib.Capabilities(bitsandbytes=False))
    with pytest.raises(LlamaLoraError, match="FSDP or DeepSpeed is not supported.*DDP"):
        model_lib.check_sharding("nf4", sharded=True)
    model_lib.check_sharding("nf4", sharded=False)
    model_lib.check_sharding("none", sharded=True)
    with pytest.raises(LlamaLoraError, match="peft.lean=true cannot run on a quantized base"):
        lean.decide(PeftConfig(lean=True), "cpu", "fp32", quantization="fp4")
    assert not lean.decide(PeftConfig(method="dora"), "cuda", "bf16", quantization="nf4").lean


def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return error_paragraph(err)


def _train_argv(tiny_base, tmp_path, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"instruction": "Up.", "input": "a%d", "output": "A%d"}\n' % (i, i) for i in range(8)))
    return ["train", f"model.name_or_path={tiny_base}", f"data.source={data}", "data.train_split=train",
            f"output_dir={tmp_path / 'out'}", "run_name=r", "training.max_steps=1", *extra]


def test_train_without_bitsandbytes_names_the_extra_and_writes_nothing(tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    msg = _cli_error(capsys, *_train_argv(tiny_base, tmp_path, "model.quantization=nf4"))
    assert "needs the bitsandbytes package" in msg and "pip install 'llama-lora[quant]'" in msg
    assert not (tmp_path / "out").exists()


def test_lean_true_on_a_quantized_base_is_refused_before_anything_is_written(tiny_base, tmp_path, capsys):
    msg = _cli_error(capsys, *_train_argv(tiny_base, tmp_path, "model.quantization=int8", "peft.lean=true"))
    assert "peft.lean=true cannot run on a quantized base (model.quantization=int8)" in msg
    assert not (tmp_path / "out").exists()


def test_merge_into_a_quantized_output_is_refused(tiny_base, tmp_path, capsys):
    run = make_run(tmp_path, tiny_base)
    before = sorted(p.name for p in run.iterdir())
    msg = _cli_error(capsys, "merge", str(run), "model.quantization=nf4")
    assert "merge cannot write a quantized model (model.quantization=nf4)" in msg and "Nothing was written" in msg
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("quantization,gc", [("nf4", False), ("int8", False), ("nf4", True), ("int8", True)],
                         ids=["nf4", "int8", "nf4-checkpointing", "int8-checkpointing"])
def test_planned_peak_matches_the_measured_tensor_peak_of_a_qlora_step(tmp_path_factory, quantization, gc):
    """One real QLoRA optimizer step (PEFT's bitsandbytes layers, fp32 on CPU): every tensor alive at its
    peak, measured by PyTorch's profiler, against plan_memory's tensor total for the same batch. With
    checkpointing, int8 keeps every linear's input anyway (bitsandbytes stores it outside the hooks)."""
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from llama_lora.adapter import apply_adapter
    from llama_lora.config.load import load_config
    from llama_lora.data import IGNORE_INDEX, collate_packed
    from llama_lora.loss import response_loss_sum
    from llama_lora.planner import measure_peak_bytes, plan_memory

    path = tmp_path_factory.getbasetemp() / "quant-planner-model"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(path)
    cfg = load_config([f"model.name_or_path={path}", f"model.quantization={quantization}", "training.device=cpu",
                       "training.loss_chunk_size=0", f"model.gradient_checkpointing={str(gc).lower()}"])
    rt = model_lib.choose_runtime(cfg.training, cfg.model, model_lib.Capabilities())
    rt = dataclasses.replace(rt, lean=lean.decide(cfg.peft, "cpu", "fp32", quantization=quantization))
    model = apply_adapter(model_lib.load_model(str(path), cfg.model, rt), cfg.peft, lean=rt.lean)
    model.train()
    batch = collate_packed([{"input_ids": list(range(1, 257)), "labels": [IGNORE_INDEX] * 64 + list(range(65, 257))}
                            for _ in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        loss, n = response_loss_sum(model, batch, 0)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW state exists from here on, as in every later step
    measured = measure_peak_bytes(step, model, opt)
    plan = plan_memory(cfg, AutoConfig.from_pretrained(path), "cpu", 4, tokens_per_micro_batch=1024,
                       rows_per_micro_batch=1, loss_tokens_per_micro_batch=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                       lean=rt.lean)
    assert abs(plan.tensor_bytes - measured) <= 0.05 * measured, (plan.tensor_bytes, measured, plan.breakdown)
