"""Multi-process training on CPU (gloo), launched the way users launch it: torchrun and accelerate launch.

- 2 processes x 2 accumulation x micro 2 must train the same adapter as 1 process x 4 accumulation
  x micro 2 (same global batch, seed, packing on, dropout 0): the loss is normalised over the global
  batch's tokens, so DDP's gradient averaging changes nothing but the order of float additions.
- A 2-process run that fails after a checkpoint and is resumed must end with the adapter of the
  uninterrupted run, dropout on: every process's RNG stream is saved and restored.
- FSDP2 (sharded) on CPU: the adapter gathered from the shards is the standard PEFT one, equal to a
  one-process run, and a sharded checkpoint resumes exactly. accelerate runs FSDP only on GPUs, so this
  shards the model by hand with torch's fully_shard and drives checkpoint.py's save/load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "grape", "honey", "maple", "ocean", "zebra"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """48 short 'reverse the word' records and 6 for evaluation (eval split of 6 = 2 batches of 4 below)."""
    d = tmp_path_factory.mktemp("ddp-data")
    rows = [{"instruction": "Reverse the word.", "input": w + w[: i % 4], "output": (w + w[: i % 4])[::-1]}
            for i, w in enumerate(WORDS * 5)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:54]))
    return d


def _common(tiny_base: Path, data: Path) -> list[str]:
    return [f"model.name_or_path={tiny_base}", f"data.source={data}", "data.train_split=train",
            "data.packing=true", "peft.r=8", "training.micro_batch_size=2", "training.learning_rate=1e-2",
            "training.warmup_ratio=0", "training.log_every=1", "training.eval_every=0", "eval.batch_size=4",
            "training.seed=7"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """2 CPU processes through torchrun or `accelerate launch` with the repo's DDP config."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(_free_port())]
    proc = subprocess.run([*cmd, "-m", "llama_lora.train", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"adapters differ by {worst}"


def test_two_process_ddp_equals_one_process(tiny_base, small_data, tmp_path):
    common = [*_common(tiny_base, small_data), "peft.dropout=0", "training.max_steps=3", "training.save_every=0"]
    run_cli("train", *common, "training.gradient_accumulation_steps=4", f"output_dir={tmp_path / 'one'}",
            "run_name=one")
    # No run_name: the default one holds a timestamp, and both processes must use the same folder.
    # The DDP run also computes its loss in chunks (issue 15): through DDP's forward, the same adapter.
    ddp = _launch("torchrun", [*common, "training.gradient_accumulation_steps=2", f"output_dir={tmp_path / 'ddp'}",
                               "training.loss_chunk_size=8"])

    runs = [p for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")]  # not the run's .lock
    assert len(runs) == 1, runs
    one, two = tmp_path / "one" / "one", runs[0]
    assert json.loads((two / "run.json").read_text())["status"] == "finished"
    # Gradients summed across processes vs across micro-batches: equal up to float rounding, which
    # Adam's normalisation can blow up to ~1e-4 on near-zero gradients (lr 1e-2); a wrong batch split
    # moves weights by ~lr. lora_B starts at zero, so it must have moved well beyond that tolerance.
    a1, a2 = _adapter(one), _adapter(two)
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 5e-3
    _assert_same_adapter(a1, a2, atol=2e-4)

    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    # tokens/s and tokens_seen count every process's tokens (not rank 0's times the world size).
    assert m2["tokens_seen"] == m1["tokens_seen"] and m2["response_tokens_seen"] == m1["response_tokens_seen"]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-4)
    # Sharded evaluation (each process half the batches, sums reduced) = one process scoring all.
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-4)
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], abs=1e-5)

    # Only the main process narrates: each line once, nothing from rank 1, one progress bar of weights.
    err = ddp.stderr
    assert err.count("Training 3 steps") == 1 and "(2 x 2 accumulation x 2 processes)" in err
    assert err.count("step 3/3 loss") == 1 and err.count("Eval loss before training") == 1
    assert "[rank 1]" not in err and err.count("Adapter lora r=8") == 1
    assert (two / "train.log").read_text().count("step 3/3 loss") == 1


def test_ddp_resume_after_failure_matches_uninterrupted_run(tiny_base, small_data, tmp_path):
    # Dropout on: a resume reproduces the run only if every process gets its own RNG stream back.
    common = [*_common(tiny_base, small_data), "peft.dropout=0.1", "training.max_steps=4", "training.save_every=2",
              "training.gradient_accumulation_steps=2", f"output_dir={tmp_path}"]
    _launch("accelerate", [*common, "run_name=straight"])

    failed = _launch("torchrun", [*common, "run_name=resumed", "training.debug_nan_at_step=3"], check=False)
    assert failed.returncode != 0
    assert failed.stderr.count("The training loss became nan at step 3") == 1  # printed by rank 0 only
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    rngs = [torch.load(ckpt / f, weights_only=True)["cpu"] for f in ("rng.pt", "rng-rank1.pt")]
    assert not torch.equal(*rngs)  # the two processes' dropout streams really differ

    resumed = _launch("torchrun", [*common, "run_name=resumed"])
    assert resumed.stderr.count("Resumed from") == 1
    _assert_same_adapter(_adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed"), atol=1e-6)


FSDP_WORKER = textwrap.dedent('''
    """Run under torchrun (2 processes, gloo): FSDP2-shard a DoRA model, train, save/resume via checkpoint.py."""
    import json, sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, get_scheduler

    from llama_lora import checkpoint
    from llama_lora.artifacts import RunDir

    base, out = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (1, 48))
    batches = [{"input_ids": ids[:, i:i + 24], "labels": ids[:, i:i + 24]} for i in (0, 24, 0, 24)]

    def build(shard):
        torch.manual_seed(1)  # same adapter initialisation everywhere
        model = AutoModelForCausalLM.from_pretrained(base)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
        if shard:
            for layer in model.base_model.model.model.layers:  # the auto-wrap unit of configs/accelerate/fsdp.yaml
                fully_shard(layer)
            fully_shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, get_scheduler("constant", opt)

    def step(model, opt, sched, batch):
        model(**batch).loss.backward()  # same batch on both processes: averaged grads = one-process grads
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)

    def save_adapter(model, path):
        state = checkpoint.gathered_adapter_state(accelerator, model)  # collective, as in train.run
        if accelerator.is_main_process:
            model.save_pretrained(path, state_dict=state)
        accelerator.wait_for_everyone()

    model, opt, sched = build(shard=True)
    assert checkpoint.is_fsdp(model)
    for b in batches[:2]:
        step(model, opt, sched, b)
    run_dir = RunDir(out / "run")
    if accelerator.is_main_process:
        run_dir.path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    ckpt = Path(checkpoint.save(run_dir, accelerator, model, opt, sched, checkpoint.TrainState(step=2), keep=1))
    for b in batches[2:]:
        step(model, opt, sched, b)
    save_adapter(model, out / "straight")

    model2, opt2, sched2 = build(shard=True)
    checkpoint.load(ckpt, model2, opt2, sched2)
    for b in batches[2:]:
        step(model2, opt2, sched2, b)
    save_adapter(model2, out / "resumed")

    if accelerator.is_main_process:  # the reference: the same steps, one process, nothing sharded
        ref, ref_opt, ref_sched = build(shard=False)
        for b in batches:
            step(ref, ref_opt, ref_sched, b)
        ref.save_pretrained(out / "reference")
    accelerator.wait_for_everyone()
''')


def test_fsdp2_sharded_run_saves_the_standard_adapter_and_resumes(tiny_base, tmp_path):
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tiny_base), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert {"adapter_model.safetensors", "optimizer.pt", "rng-rank1.pt"} <= {p.name for p in ckpt.iterdir()}

    adapters = {name: load_file(str(tmp_path / name / "adapter_model.safetensors"))
                for name in ("reference", "straight", "resumed")}
    # Standard PEFT keys (no FSDP or adapter-name infixes), DoRA magnitudes included, whole tensors.
    keys = adapters["reference"].keys()
    assert any("lora_magnitude_vector" in k for k in keys) and not any(".default" in k or "fsdp" in k for k in keys)
    _assert_same_adapter(adapters["reference"], adapters["straight"], atol=1e-5)
    _assert_same_adapter(adapters["straight"], adapters["resumed"], atol=1e-6)
