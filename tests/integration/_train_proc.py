"""Shared by test_resume.py and test_signals.py: a tiny training run through the real CLI in a
subprocess that a test can watch, signal or kill, and the uninterrupted reference it is compared to."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS = 10
WORDS = ["apple", "house", "river", "stone", "cloud", "green", "table", "light", "music", "ocean"]


def data_file(root: Path) -> Path:
    """64 uppercase-the-word records (idempotent: every caller in the session gets the same file)."""
    path = root / "reliability-data.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        rows = []
        for _ in range(64):
            w = rng.choice(WORDS) + rng.choice(WORDS)
            rows.append(json.dumps({"instruction": "Uppercase the word.", "input": w, "output": w.upper()}))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        tmp.replace(path)
    return path


def train_args(base: Path, data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """10 steps of 2x2 examples, a checkpoint every 3 steps, eval after every step, loss logged every
    2 steps: logging windows span checkpoints, and something is logged at every checkpoint step."""
    return [
        "train", f"model.name_or_path={base}", f"data.source={data}", "data.train_split=train",
        f"output_dir={out}", f"run_name={name}", f"training.max_steps={STEPS}", "training.micro_batch_size=2",
        "training.gradient_accumulation_steps=2", "training.save_every=3", "training.eval_every=1",
        "training.log_every=2", "training.learning_rate=1e-3", "data.max_eval_examples=4", "eval.batch_size=4",
        "training.keep_checkpoints=2", "peft.r=4", "peft.dropout=0.1", *extra,
    ]


class TrainProc:
    """`python -m llama_lora.cli train ...` in the background; stdout+stderr go to a file."""

    def __init__(self, args: list[str], log_file: Path, env: dict[str, str] | None = None):
        self.log_file = log_file
        self._fh = open(log_file, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_lora.cli", *args], stdout=self._fh,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_file.read_text()

    def wait_until(self, predicate, timeout: float = 120, what: str = "") -> None:
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def wait_for_step(self, run: Path, step: int) -> None:
        """Until train.log shows optimizer step `step` finished (a log line or a checkpoint at it)."""
        log = run / "train.log"
        marks = (f"step {step}/", f"step {step} eval")
        self.wait_until(lambda: log.is_file() and any(m in log.read_text() for m in marks), what=f"step {step}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._fh.close()


def run_to_end(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> str:
    proc = TrainProc(args, log_file, env)
    rc = proc.wait()
    assert rc == 0, f"training failed ({rc}):\n{proc.output()[-4000:]}"
    return proc.output()


def reference_run(root: Path, base: Path) -> Path:
    """The uninterrupted run every interrupted one must reproduce (trained once per session)."""
    run = root / "reference" / "ref"
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        run_to_end(train_args(base, data_file(root), root / "reference", "ref"), root / "reference.out")
    return run


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run: Path, ref: Path) -> None:
    got, want = adapter(run), adapter(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")  # fp32 tolerances
    # and not trivially: training moved the adapter away from its initialisation (B starts at zero)
    assert any(float(t.abs().max()) > 0 for k, t in want.items() if "lora_B" in k)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar as [(step, value)], read back as TensorBoard itself would."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_curve_continues(run: Path, ref: Path) -> None:
    """One value per logged step, steps increasing, no restart, and the same numbers as the reference."""
    got, want = scalars(run), scalars(ref)
    assert sorted(got) == sorted(want) == ["eval/loss", "train/loss", "train/lr", "train/tokens_per_second"]
    assert [s for s, _ in want["eval/loss"]] == list(range(STEPS + 1))  # eval at 0 (before training) .. 10
    assert [s for s, _ in want["train/loss"]] == [2, 4, 6, 8, 10]
    for tag in got:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], f"{tag}: steps {steps}"
        if tag != "train/tokens_per_second":  # a wall-clock rate
            torch.testing.assert_close([v for _, v in got[tag]], [v for _, v in want[tag]], msg=tag)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_metrics(run: Path, ref: Path) -> None:
    got, want = metrics(run), metrics(ref)
    for key in ("steps", "tokens_seen", "response_tokens_seen"):
        assert got[key] == want[key], key
    for key in ("train_loss", "eval_loss", "eval_loss_before"):
        assert abs(got[key] - want[key]) < 1e-5, key
