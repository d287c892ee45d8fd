"""Every command on a quantized (QLoRA nf4) run through the real CLI with real bitsandbytes on CPU: train,
kill -9 and resume to exactly the uninterrupted run, eval and baseline (the base quantized as in training,
from the saved config), infer, merge with both differences recorded, export to GGUF (the dequantized base
plus the adapter, verified), a quantization sweep in an experiment, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_lora.artifacts import RunDir
from tests.helpers import (
    TrainProc, assert_same_adapter, assert_same_metrics, data_file, reference_run, run_cli, run_to_end, train_args,
)

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

QUANT = "model.quantization=nf4"


def _qlora_args(tiny_base, data, out, name):
    """train_args' run made shorter (6 steps, a checkpoint every 2, eval at the end only), nf4."""
    short = {"training.max_steps=10": "training.max_steps=6", "training.save_every=3": "training.save_every=2",
             "training.eval_every=1": "training.eval_every=0"}
    return [short.get(a, a) for a in train_args(tiny_base, data, out, name, QUANT)]


@pytest.fixture(scope="module")
def qroot(tmp_path_factory):
    return tmp_path_factory.mktemp("qlora")


@pytest.fixture(scope="module")
def qref(qroot, tiny_base):
    """The uninterrupted 6-step nf4 run (dropout on, a checkpoint every 2 steps)."""
    out = run_to_end(_qlora_args(tiny_base, data_file(qroot), qroot / "ref", "ref"), qroot / "ref.out")
    assert "model.quantization=nf4: PEFT's bitsandbytes layers" in out  # the lean step stepped aside, logged
    assert "nf4 bitsandbytes 4-bit, double quantization, compute float32" in out
    return qroot / "ref" / "ref"


def test_qlora_kill_9_then_resume_equals_the_uninterrupted_run(qroot, tiny_base, qref, tmp_path):
    args = _qlora_args(tiny_base, data_file(qroot), tmp_path, "run")
    run = tmp_path / "run"
    first = TrainProc(args, tmp_path / "first.out")
    first.wait_until(lambda: len(RunDir(run).checkpoint_dirs()) >= 2, timeout=300, what="the step-4 checkpoint")
    first.kill()
    assert first.proc.returncode == -9 and RunDir(run).checkpoint_dirs()
    out = run_to_end(args, tmp_path / "second.out")
    assert "Resumed from" in out
    assert_same_adapter(run, qref)
    assert_same_metrics(run, qref)


def test_eval_baseline_infer_and_merge_on_a_qlora_run(qref, tmp_path):
    assert "quantization: nf4" in (qref / "config.yaml").read_text()  # what every later command reads
    ev = run_cli("eval", str(qref), "data.max_eval_examples=4", "eval.max_new_tokens=4", "eval.num_samples=0")
    base = run_cli("baseline", str(qref), "data.max_eval_examples=4", "eval.max_new_tokens=4", "eval.num_samples=0")
    for proc in (ev, base):  # the base quantized as in training, from the saved config
        assert "base nf4-quantized by bitsandbytes as in training" in proc.stderr, proc.stderr[-2000:]
    answer = run_cli("infer", f"run_dir={qref}", "Uppercase the word.", "--input", "apple", "infer.max_new_tokens=4")
    # (a barely trained tiny model may answer with an immediate end-of-turn: compared below, not required)

    merged = run_cli("merge", str(qref))
    report = json.loads((qref / "merged" / "merge.json").read_text())
    assert report["quantization"] == "nf4" and report["dequantized_to"] == "float32"
    # the merge itself (merged vs the dequantized base + adapter): verified to fp32 tolerance
    assert report["max_abs_logit_diff_vs_dequantized_base"] <= report["tolerance"]
    # vs what was trained (the quantized base + adapter): measured and shown; eval computes as training
    # does (fp32 dequantize + matmul), so dequantizing changes nothing beyond float rounding here
    assert report["max_abs_logit_diff_vs_quantized_base"] < 1e-3 * report["logit_scale"]
    assert "merged vs dequantized base + adapter" in merged.stdout and "what was trained" in merged.stdout
    config = json.loads((qref / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: from_pretrained loads it unquantized
    again = run_cli("infer", f"run_dir={qref / 'merged'}", "Uppercase the word.", "--input", "apple", "infer.max_new_tokens=4")
    assert again.stdout.strip() == answer.stdout.strip()  # greedy: the merged model answers as base + adapter


def test_export_of_a_qlora_run_holds_the_dequantized_base_plus_the_adapter(qref, tmp_path):
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from llama_lora.model import import_bitsandbytes

    before = sorted(p.relative_to(qref).as_posix() for p in qref.rglob("*") if "merged" not in p.parts)
    out = tmp_path / "nf4-f16"
    proc = run_cli("export", str(qref), "--output", str(out))
    assert f"exported: {out / 'model.gguf'}" in proc.stdout, proc.stdout
    assert "nf4 base: max |logit diff| merged vs dequantized base + adapter" in proc.stdout
    assert "the GGUF holds the base dequantized to float32" in proc.stdout
    report = json.loads((out / "export.json").read_text())
    assert report["tensors"]["compared"] == 20 and report["tensors"]["max_rel_error"] < 1e-3
    merged = report["merge"]  # as merge.json records it
    assert merged["quantization"] == "nf4" and merged["dequantized_to"] == "float32"
    assert merged["max_abs_logit_diff_vs_dequantized_base"] <= merged["tolerance"]
    assert merged["max_abs_logit_diff_vs_quantized_base"] < 1e-3 * merged["logit_scale"]
    assert merged["relative_diff_vs_quantized_base"] == pytest.approx(
        merged["max_abs_logit_diff_vs_quantized_base"] / merged["logit_scale"])
    assert sorted(p.relative_to(qref).as_posix() for p in qref.rglob("*") if "merged" not in p.parts) == before

    # Independently: bitsandbytes' own nf4 round trip of the base weight (64-value blocks, double-quantized
    # statistics, as training loaded it) plus alpha/r * B A from the adapter file, against the file as read back.
    import_bitsandbytes()
    import bitsandbytes.functional as bnb_f

    base = load_file(Path(json.loads((qref / "run.json").read_text())["base_model"]) / "model.safetensors")
    adapter = load_file(qref / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((qref / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = {rt.name: rt for rt in gguf.GGUFReader(out / "model.gguf").tensors}
    for module, name in [("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"),
                         ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        w = base[module + ".weight"]
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        update = scale * adapter[f"base_model.model.{module}.lora_B.weight"] @ adapter[
            f"base_model.model.{module}.lora_A.weight"]
        want = bnb_f.dequantize_4bit(packed, state, quant_type="nf4") + update
        rt = tensors[name]
        got = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32))
        tol = 1e-3 * float(want.abs().max())  # f16's read-back tolerance
        assert float((got - want).abs().max()) <= tol, module
        assert float((got - (w + update)).abs().max()) > 10 * tol, module  # not the unquantized base: nf4 rounding


def test_experiment_sweeps_quantization(qroot, tiny_base, tmp_path):
    data = data_file(qroot)
    run_cli("experiment", "-m", "model.quantization=none,int8", f"model.name_or_path={tiny_base}",
            f"data.source={data}", "data.train_split=train", "training.max_steps=2", "training.micro_batch_size=4",
            "training.gradient_accumulation_steps=1", "training.save_every=0", "data.max_eval_examples=4",
            "experiment.evaluate=false", "experiment.name=q", f"output_dir={tmp_path}")
    runs = sorted(p for p in (tmp_path / "q").iterdir() if (p / "config.yaml").is_file())
    assert len(runs) == 2 and all(RunDir(r).is_finished() for r in runs)
    assert sorted(next(line.split()[-1] for line in (r / "config.yaml").read_text().splitlines()
                       if line.strip().startswith("quantization:")) for r in runs) == ["int8", "none"]


def test_two_process_ddp_on_a_quantized_base(qroot, tiny_base, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "llama_lora.train", f"model.name_or_path={tiny_base}", f"data.source={data_file(qroot)}",
           "data.train_split=train", QUANT, "training.max_steps=2", "training.micro_batch_size=2",
           "training.gradient_accumulation_steps=1", "training.save_every=0", "data.max_eval_examples=4",
           "training.learning_rate=1e-2", f"output_dir={tmp_path}", "run_name=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "ddp"
    assert RunDir(run).is_finished() and "(2 x 1 accumulation x 2 processes)" in proc.stderr
    from safetensors.torch import load_file

    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-3  # it trained


def test_loftq_trains_end_to_end_and_starts_nearer_the_unquantized_base(qroot, root, tiny_base, qref, tmp_path):
    """peft.init=loftq through the real `train`: the adapter starts at the rank-r fit of the nf4 rounding
    error, so the eval loss before training (logged by train) lies nearer the unquantized base's than plain
    QLoRA's does; the run then trains, saves, and eval/infer load it on the base quantized as in training."""
    data = data_file(qroot)
    short = ["training.max_steps=2", "training.save_every=0"]
    out = run_to_end([*_qlora_args(tiny_base, data, tmp_path, "loftq"), "peft.init=loftq", *short],
                     tmp_path / "loftq.out")
    assert "LoftQ:" in out and "adapted 4-bit layers start at the rank-4 fit" in out

    def before(run):
        return json.loads((run / "metrics.json").read_text())["eval_loss_before"]

    # the session's unquantized reference run (tests/helpers.reference_run): same base, data and eval set
    loftq, plain, unquantized = before(tmp_path / "loftq"), before(qref), before(reference_run(root, tiny_base))
    assert abs(loftq - unquantized) < abs(plain - unquantized), (loftq, plain, unquantized)
    run = tmp_path / "loftq"
    assert RunDir(run).is_finished()
    ev = run_cli("eval", str(run), "data.max_eval_examples=4", "eval.max_new_tokens=4", "eval.num_samples=0")
    assert "base nf4-quantized by bitsandbytes as in training" in ev.stderr, ev.stderr[-2000:]
    run_cli("infer", f"run_dir={run}", "Uppercase the word.", "--input", "apple", "infer.max_new_tokens=4")


def test_a_qlora_adapter_records_its_quantization_and_plain_peft_reproduces_it(qref):
    """The adapter folder carries the exact BitsAndBytesConfig it was trained on (a file and a model-card
    section with the plain-PEFT load); that documented load reproduces llama-lora's model, while the same
    adapter on a plain NF4 base without double quantization is off by far more."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llama_lora import runs
    from llama_lora.config.load import load_config_file
    from llama_lora.model import QUANT_CONFIG_FILE

    adapter_dir = qref / "adapter"
    recorded = json.loads((adapter_dir / QUANT_CONFIG_FILE).read_text())
    assert recorded["bnb_4bit_quant_type"] == "nf4" and recorded["bnb_4bit_use_double_quant"] is True
    card = (adapter_dir / "README.md").read_text()
    assert "BitsAndBytesConfig.from_dict(json.load(open(\"adapter/quantization_config.json\")))" in card
    base_path = RunDir(qref).status()["base_model"]

    cfg = load_config_file(qref / "config.yaml")
    cfg.infer.run_dir = str(qref)
    ours = runs.load(cfg).model
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 40, 41]])

    def logits(model):
        with torch.no_grad():
            return model(ids).logits.float()

    def plain(quant, keep_precision=True):  # the card's recipe, with `quant` as the quantization
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, device_map={"": "cpu"},
                                                    dtype=torch.float32)
        for module in base.modules():
            if keep_precision and getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    ref = logits(ours)
    with ours.disable_adapter():
        effect = (ref - logits(ours)).abs().max()
    assert effect > 0
    recipe = (logits(plain(BitsAndBytesConfig.from_dict(recorded))) - ref).abs().max() / effect
    bf16_eval = (logits(plain(BitsAndBytesConfig.from_dict(recorded), False)) - ref).abs().max() / effect
    print(f"without the card's CPU loop: {bf16_eval:.4f}")
    other = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    wrong = (logits(plain(other)) - ref).abs().max() / effect
    print(f"plain-PEFT load off by {recipe:.4f} of the adapter's effect with the recorded config, "
          f"{wrong:.3f} on nf4 without double quantization")
    assert recipe < 0.005, recipe
    assert wrong > 20 * max(recipe, 1e-4), (recipe, wrong)
