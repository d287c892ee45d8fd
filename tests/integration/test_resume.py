"""Crash safety through the real CLI: kill -9 at a random step or in the middle of a save, run the same
command again, and get exactly the uninterrupted run (adapter, loss curve, metrics); a non-finite loss
stops cleanly. One uninterrupted reference run (10 steps on the tiny base) is shared with test_signals."""

from __future__ import annotations

import json
import random

import pytest

from llama_lora import artifacts, cli
from llama_lora.artifacts import RunDir
from llama_lora.errors import LlamaLoraError
from tests.helpers import (
    STEPS, TrainProc, assert_curve_continues, assert_same_adapter, assert_same_metrics, data_file, error_paragraph,
    metrics, reference_run, run_to_end, train_args,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(root, tiny_base):
    return reference_run(root, tiny_base)


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(root, tiny_base, ref, tmp_path):
    kill_at = random.randint(4, STEPS - 1)
    args = train_args(tiny_base, data_file(root), tmp_path, "run")
    run = tmp_path / "run"
    first = TrainProc(args, tmp_path / "first.out")
    first.wait_for_step(run, kill_at)
    first.kill()  # SIGKILL: no handler, no cleanup, no last words
    assert first.proc.returncode == -9

    checkpoints = RunDir(run).checkpoint_dirs()
    assert 1 <= len(checkpoints) <= 2, f"killed at step {kill_at}: {checkpoints}"  # keep_checkpoints=2
    newest = checkpoints[-1]
    step = int(newest.name.split("-")[1])
    assert step % 3 == 0 and kill_at - 3 <= step <= kill_at, (kill_at, step)
    # The trainer state carries everything the loop needs to continue as if nothing happened.
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == step
    assert state["window_steps"] == step % 2  # the loss window is logged every 2 steps: 3 and 9 are mid-window
    assert (state["window_loss"] > 0) == (step % 2 == 1)
    assert state["eval_loss_before"] == pytest.approx(metrics(ref)["eval_loss_before"], abs=1e-6)
    assert state["response_tokens"] > 0 and state["tokens"] > state["response_tokens"]
    assert {p.name for p in newest.iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
        "trainer_state.json"}
    assert RunDir(run).status()["status"] == "running" and not (run / "adapter").exists()

    out = run_to_end(args, tmp_path / "second.out")  # the very same command
    assert f"Resumed from {newest} (step {step} of {STEPS})" in out, f"killed at step {kill_at}"
    assert_same_adapter(run, ref)
    assert_curve_continues(run, ref)
    assert_same_metrics(run, ref)
    assert RunDir(run).is_finished() and not (run / "checkpoints").exists()


def test_kill_during_saves_never_leaves_a_half_written_artifact(root, tiny_base, ref, tmp_path, capsys):
    """Kill -9 inside the step-6 checkpoint save, then inside the final adapter save (the testing knob
    holds each save, fully written, just before its rename); each time the half-written folder is
    ignored by resume, infer and merge, and cleaned; the third run finishes as if never interrupted."""
    args = train_args(tiny_base, data_file(root), tmp_path, "run")
    run = tmp_path / "run"
    slow_saves = {artifacts.SAVE_DELAY_ENV: "2"}

    first = TrainProc(args, tmp_path / "first.out", env=slow_saves)
    tmp = run / "checkpoints" / f".step-000006.tmp-{first.pid}"
    first.wait_until(lambda: (tmp / "trainer_state.json").is_file(), what="the step-6 save")
    first.kill()
    assert {p.name for p in tmp.iterdir()} >= {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"}
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["step-000003"]

    second = TrainProc(args, tmp_path / "second.out", env=slow_saves)
    tmp_adapter = run / f".adapter.tmp-{second.pid}"
    second.wait_until(lambda: (tmp_adapter / "adapter_model.safetensors").is_file(), what="the adapter save")
    second.kill()
    out = second.output()
    assert f"removed .step-000006.tmp-{first.pid}" in out and f"Resumed from {run}/checkpoints/step-000003" in out
    assert not tmp.exists()
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["step-000006", "step-000009"]
    # The adapter exists only under its temporary name: nothing takes the run for finished.
    assert not (run / "adapter").exists() and not RunDir(run).is_finished()
    with pytest.raises(LlamaLoraError, match="No finished run"):
        artifacts.latest_finished_run(tmp_path)
    for command in ("infer", "merge"):
        if command in cli.COMMANDS:
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cli.main([command, f"infer.run_dir={run}", *(["Say hi."] if command == "infer" else [])])
            err = " ".join(capsys.readouterr().err.split())
            assert e.value.code == 2 and "Traceback" not in err
            # a run of llama-lora's that was killed: said so, with the command that resumes it
            assert "is a llama-lora run whose training did not finish" in err and "is gone" in err, err
            assert f"output_dir={tmp_path} run_name=run" in err, err

    out = run_to_end(args, tmp_path / "third.out")
    assert f"removed .adapter.tmp-{second.pid}" in out and f"Resumed from {run}/checkpoints/step-000009" in out
    assert_same_adapter(run, ref)
    assert_curve_continues(run, ref)
    assert_same_metrics(run, ref)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_non_finite_loss_stops_cleanly_naming_step_and_last_good_checkpoint(root, tiny_base, tmp_path, capsys):
    # In-process (the same CLI code as a subprocess, without its import time).
    args = train_args(tiny_base, data_file(root), tmp_path, "run", "training.debug_nan_at_step=5")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    stderr = capsys.readouterr().err
    assert exc.value.code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    err = " ".join(stderr.split())
    assert "The training loss became nan at step 5; stopped without saving." in err
    assert f"Last good checkpoint: {run}/checkpoints/step-000003." in err
    assert "Lower training.learning_rate" in err
    # Nothing garbage was saved: no adapter, no checkpoint at or after the bad step, the good one intact.
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["step-000003"]
    status = RunDir(run).status()
    assert status["status"] == "failed" and "step 5" in status["error"]
    assert status["checkpoint"] == str(run / "checkpoints" / "step-000003")


def _run_bytes(run) -> dict[str, str]:
    """config.yaml, run.json and every checkpoint file, by content hash."""
    import hashlib

    files = [run / "config.yaml", run / "run.json", *sorted((run / "checkpoints").rglob("*"))]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def test_resume_with_other_data_is_refused_naming_it_unless_on_purpose(root, tiny_base, tmp_path, capsys):
    """Issue 19: a resume with another data.source used to continue silently from the checkpoint and
    rewrite config.yaml. Now it is refused (exit 2, one paragraph naming what changed, the run untouched);
    training.resume_despite_changes=true continues on purpose and records the changes in run.json."""
    data = data_file(root)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:40]))
    run = tmp_path / "run"
    # An unfinished run with a checkpoint at step 3 (the non-finite guard stops it at step 5), in-process.
    with pytest.raises(SystemExit):
        cli.main(train_args(tiny_base, data, tmp_path, "run", "training.debug_nan_at_step=5"))
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["step-000003"]
    before = _run_bytes(run)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exc:
        cli.main(train_args(tiny_base, other, tmp_path, "run"))
    err = error_paragraph(capsys.readouterr().err)
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"data.source: '{data}' there, '{other}' now" in err, err
    assert "training data: '" in err and "tokenized examples" in err  # the data fingerprint differs too
    assert "overwrite=true" in err and "training.resume_despite_changes=true" in err
    assert "debug_nan_at_step" not in err  # a knob that does not define the run
    assert _run_bytes(run) == before, "a refused resume must leave the run as it was"

    with pytest.raises(SystemExit) as exc:  # any field that defines the trajectory, e.g. the learning rate
        cli.main(train_args(tiny_base, data, tmp_path, "run", "training.learning_rate=5e-4"))
    err = error_paragraph(capsys.readouterr().err)
    assert exc.value.code == 2 and "training.learning_rate: 0.001 there, 0.0005 now" in err, err
    assert "data.source" not in err and _run_bytes(run) == before

    cli.main(train_args(tiny_base, other, tmp_path, "run", "training.resume_despite_changes=true",
                        "training.log_every=5"))  # a logging knob: no change to name
    log = (run / "train.log").read_text()
    assert "Resumed from" in log and "despite changes" in log and "log_every" not in log.split("despite")[-1]
    status = RunDir(run).status()
    assert status["status"] == artifacts.FINISHED
    assert any(c.startswith("data.source:") for c in status["resumed_despite_changes"])
