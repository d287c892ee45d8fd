"""SIGTERM/SIGINT through the real CLI: the first signal finishes the step, saves a checkpoint, says
where and exits non-zero; the same command resumes to the uninterrupted result; a second signal
exits at once, even in the middle of that save."""

from __future__ import annotations

import signal
import time

import pytest

from llama_lora import artifacts
from llama_lora.artifacts import RunDir
from tests.helpers import (
    STEPS, TrainProc, assert_curve_continues, assert_same_adapter, assert_same_metrics, data_file, reference_run,
    run_to_end, train_args,
)

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_says_where_and_the_same_command_resumes(root, tiny_base, tmp_path):
    ref = reference_run(root, tiny_base)
    args = train_args(tiny_base, data_file(root), tmp_path, "run")
    run = tmp_path / "run"
    first = TrainProc(args, tmp_path / "first.out")
    first.wait_for_step(run, 4)
    first.proc.send_signal(signal.SIGTERM)
    rc = first.wait(timeout=120)
    out = first.output()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: saving a checkpoint after this step" in out
    assert "Traceback" not in out
    status = RunDir(run).status()
    assert status["status"] == "interrupted"
    stopped_at, checkpoint = status["step"], status["checkpoint"]
    # It finished the step it was in (4 or a later one), then saved exactly there, off the save_every grid.
    assert 4 <= stopped_at < STEPS and checkpoint == str(run / "checkpoints" / f"step-{stopped_at:06d}")
    assert f"Stopped by SIGTERM at step {stopped_at}; checkpoint saved to {checkpoint}. Run the same command again to resume." in out
    assert RunDir(run).checkpoint_dirs()[-1] == run / "checkpoints" / f"step-{stopped_at:06d}"
    assert not (run / "adapter").exists()

    out = run_to_end(args, tmp_path / "second.out")
    assert f"Resumed from {checkpoint} (step {stopped_at} of {STEPS})" in out
    assert_same_adapter(run, ref)
    assert_curve_continues(run, ref)
    assert_same_metrics(run, ref)


def test_second_sigint_exits_at_once_even_mid_save(root, tiny_base, tmp_path):
    args = train_args(tiny_base, data_file(root), tmp_path, "run")
    run = tmp_path / "run"
    # Each save is held 60 s before its rename (testing knob), so "at once" is measurable.
    proc = TrainProc(args, tmp_path / "out", env={artifacts.SAVE_DELAY_ENV: "60"})
    proc.wait_for_step(run, 1)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_until(lambda: "SIGINT received: saving a checkpoint after this step (again to exit now)" in proc.output(),
                    what="the first SIGINT message")
    ckpts = run / "checkpoints"
    proc.wait_until(lambda: any((p / "trainer_state.json").is_file() for p in ckpts.glob(".step-*.tmp-*")),
                    what="the checkpoint save")
    t0 = time.time()
    proc.proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    assert rc == 128 + signal.SIGINT
    assert time.time() - t0 < 10  # not the 60 s the save would still have taken
    # Gone at once: the save it cut short left only its temporary folder, which nothing takes for complete.
    assert RunDir(run).checkpoint_dirs() == []
    assert len(list(ckpts.glob(".step-*.tmp-*"))) == 1
    assert RunDir(run).status()["status"] == "running"


def test_ctrl_c_while_tokenizing_a_large_data_set_exits_at_once(tiny_base, tmp_path):
    """Issue 19 kind 7: Ctrl-C during data loading/tokenizing (96k rows, one of them 30 MB) stops the
    command within seconds, with "interrupted" and exit 130, and leaves no run that looks trained."""
    import json

    rows = [{"instruction": "Uppercase the word.", "input": f"word{i}", "output": f"WORD{i}"} for i in range(96_000)]
    rows[50]["output"] = "word " * 6_000_000
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_args(tiny_base, data, tmp_path, "big")
    proc = TrainProc(args, tmp_path / "big.out")
    proc.wait_until(lambda: "Runtime:" in proc.output(), timeout=120, what="the runtime line")
    time.sleep(2)  # inside datasets' load or the tokenizer loop (tens of seconds here)
    assert proc.proc.poll() is None, "finished before it could be interrupted"
    proc.proc.send_signal(signal.SIGINT)
    t0 = time.time()
    rc = proc.wait(timeout=60)
    waited = time.time() - t0
    out = proc.output()
    assert rc == 130 and "interrupted" in out and "Traceback" not in out, out[-3000:]
    assert waited < 15, f"took {waited:.1f}s to stop"
    assert "Training 10 steps" not in out
    assert not (tmp_path / "big" / "adapter").exists() and not (tmp_path / "big" / "checkpoints").exists()
