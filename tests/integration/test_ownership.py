"""Never touch what llama-lora did not write: every command that writes (train, experiment, eval, baseline,
merge, infer --output-file) runs for real beside files and folders of the user's, including names that look
like llama-lora's temporaries (`.X.tmp-PID`, `.X.old-PID` of dead processes), and leaves each of them
byte- and mtime-identical. (export: tests/integration/test_export.py; the refusals: the bad-input table.)"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_lora.artifacts import RunDir
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(folder: Path) -> list[Path]:
    """The user's own entries in `folder`: plain files, a folder, and names shaped like stale temporaries."""
    pid = _dead_pid()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my notes.txt").write_text("mine\n")
    (folder / f".thesis.tmp-{pid}").mkdir()
    (folder / f".thesis.tmp-{pid}" / "c.txt").write_text("chapter 1\n")
    (folder / f".settings.old-{pid}").write_text("v1\n")
    (folder / f".adapter.bak-{pid}").write_text("a backup of mine\n")
    (folder / "mine").mkdir()
    (folder / "mine" / "data.bin").write_bytes(b"\x00\x01\x02")
    return [folder / "my notes.txt", folder / f".thesis.tmp-{pid}" / "c.txt", folder / f".settings.old-{pid}",
            folder / f".adapter.bak-{pid}", folder / "mine" / "data.bin"]


def snapshot(paths: list[Path]) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def test_use_commands_leave_the_users_files_alone(quickstart_run, tmp_path):
    out = tmp_path / "outputs"
    run = out / "qs"
    shutil.copytree(quickstart_run, run)
    answers = tmp_path / "answers"
    planted = plant(out) + plant(run) + plant(answers)
    before = snapshot(planted)
    quick = ["data.max_eval_examples=4", "eval.max_new_tokens=4", "eval.num_samples=0"]
    run_cli("eval", str(run), *quick)
    run_cli("baseline", str(run), *quick)
    run_cli("merge", str(run))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Reverse the word.", "input": "garden"}\n')
    run_cli("infer", f"run_dir={run}", "--input-file", str(prompts), "--output-file", str(answers / "answers.jsonl"),
            "infer.max_new_tokens=8")
    assert (run / "eval.json").is_file() and (run / "merged" / "merge.json").is_file()
    assert (answers / "answers.jsonl").read_text().count('"response"') == 1
    assert snapshot(planted) == before
    # The one new entry beside the answers is the answers file itself (no temporary left behind).
    assert {p.name for p in answers.iterdir()} - {p.relative_to(answers).parts[0] for p in planted
                                                   if answers in p.parents} == {"answers.jsonl"}


def test_train_and_experiment_leave_the_users_files_alone(tiny_base, tmp_path):
    from llama_lora.embedded.data import generate_splits, write_jsonl

    data = tmp_path / "data"
    write_jsonl(generate_splits(n_train=32, n_validation=8, n_test=8), data)
    out = tmp_path / "out"
    planted = plant(out) + plant(out / "exp")
    before = snapshot(planted)
    tiny = [f"model.name_or_path={tiny_base}", f"data.source={data}", "data.train_split=train",
            "data.max_seq_length=128", "data.max_eval_examples=4", "training.max_steps=2",
            "training.micro_batch_size=4", "training.gradient_accumulation_steps=1", "training.save_every=1",
            "eval.num_samples=0", f"output_dir={out}"]
    run_cli("train", *tiny, "run_name=run1")
    run_cli("train", *tiny, "run_name=run1", "overwrite=true")  # replaces only its own run
    assert RunDir(out / "run1").is_finished()
    run_cli("experiment", "-m", "peft.r=2,4", *tiny, "experiment.name=exp", "experiment.evaluate=false")
    assert (out / "exp" / "summary.json").is_file()
    assert snapshot(planted) == before
