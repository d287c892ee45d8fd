"""One writer per run (issue 19), through the real CLI: a second `train` of a run that is training is
refused at once and leaves the first run exactly as a lone run would; after a kill -9 the OS has
dropped the lock and the same command resumes; train overwrite=true, merge and eval of a run that
another process holds are refused without touching it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time

import pytest

from llama_lora import artifacts
from llama_lora.artifacts import RunDir
from tests.helpers import (
    TrainProc, assert_same_adapter, data_file, error_paragraph, reference_run, run_cli, run_to_end,
    train_args,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(root, tiny_base):
    return reference_run(root, tiny_base)


def _tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _running(run):
    # run.json says running from the moment train owns the folder; training has begun once it names the base
    return lambda: RunDir(run).status().get("status") == "running" and "base_model" in RunDir(run).status()


def _refused(proc, path, pid: int, purpose: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    msg = error_paragraph(proc.stderr)
    assert f"Run directory {path} is in use by another llama-lora process (pid {pid}, `{purpose}`, since " in msg, msg
    assert re.search(r"since \d\d:\d\d:\d\d\)", msg), msg
    return msg


def test_a_second_train_of_a_running_run_is_refused_and_the_first_is_untouched(root, tiny_base, ref, tmp_path):
    args = train_args(tiny_base, data_file(root), tmp_path, "dup")
    run = tmp_path / "dup"
    # Slow saves keep the first one busy (and its checkpoints mid-write) while the second starts.
    first = TrainProc(args, tmp_path / "first.out", env={artifacts.SAVE_DELAY_ENV: "3"})
    first.wait_until(_running(run), what="run.json says running")
    config = (run / "config.yaml").read_bytes()
    t0 = time.time()
    second = run_cli(*args, check=False, timeout=120)
    took = time.time() - t0
    assert first.proc.poll() is None, "the first run finished before the second was refused: raise the delay"
    msg = _refused(second, run, first.pid, "train")
    assert "choose another run_name=" in msg
    assert took < 60, took  # refused before the model is loaded, let alone trained
    assert (run / "config.yaml").read_bytes() == config
    assert RunDir(run).status()["status"] == "running"

    assert first.wait() == 0, first.output()[-3000:]
    assert RunDir(run).is_finished()
    assert_same_adapter(run, ref)  # as if the second had never been started
    log = (run / "train.log").read_text()
    assert log.count("Run directory ") == 1 and "Resumed from" not in log and "in use by" not in log
    assert (run / "config.yaml").read_bytes() == config
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())  # no lock file inside


def test_kill_9_drops_the_lock_and_the_same_command_resumes(root, tiny_base, ref, tmp_path):
    args = train_args(tiny_base, data_file(root), tmp_path, "run")
    run = tmp_path / "run"
    first = TrainProc(args, tmp_path / "first.out")
    first.wait_for_step(run, 4)  # step-3 checkpoint saved
    first.kill()
    assert first.proc.returncode == -9
    assert RunDir(run).lock_file.is_file()  # the file stays; the lock went with the process

    out = run_to_end(args, tmp_path / "second.out")
    assert "Resumed from" in out and "in use by" not in out
    assert_same_adapter(run, ref)


def test_train_overwrite_merge_and_eval_of_a_held_run_are_refused(ref, tmp_path, tiny_base, root):
    run = tmp_path / "held"
    shutil.copytree(ref, run)
    before = _tree(run)
    with RunDir(run).lock("eval"):  # this process stands in for a long eval of the run
        train = run_cli(*train_args(tiny_base, data_file(root), tmp_path, "held", "overwrite=true"),
                        check=False, timeout=120)
        _refused(train, run, os.getpid(), "eval")
        merge = run_cli("merge", str(run), check=False, timeout=120)
        _refused(merge, run, os.getpid(), "eval")
        assert "then run `merge` again" in error_paragraph(merge.stderr)
        evaluation = run_cli("eval", str(run), check=False, timeout=120)
        _refused(evaluation, run, os.getpid(), "eval")
    assert _tree(run) == before  # overwrite=true did not clear it, merge wrote no merged/
