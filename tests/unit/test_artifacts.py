"""The run-folder contract: atomic saves that a kill cannot half-finish, stale-file recovery, the
checkpoint listing resume trusts, and the free-space guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_lora import artifacts
from llama_lora.artifacts import RunDir, atomic_dir, check_free_space, clean_stale, write_json, write_text
from llama_lora.errors import LlamaLoraError


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_replaces_whole_directory_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "b.txt").write_text("two")
        assert not target.exists()  # nothing visible until the body finished
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert _tree(target) == {"a.txt": "new"}  # replaced as a whole: b.txt of the old version is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_dir_failure_keeps_the_previous_version(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("boom")
    assert _tree(target) == {"weights": "good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_dir_os_error_becomes_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LlamaLoraError, match=r"Could not write .*file/sub.*Nothing was replaced"):
        with atomic_dir(tmp_path / "file" / "sub"):
            pass


_KILLED_SAVE = """
import sys
from pathlib import Path
from llama_lora.artifacts import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "adapter_model.safetensors").write_text("new weights")
    (tmp / "trainer_state.json").write_text("{}")
"""


def test_kill_9_during_a_save_leaves_the_old_version_and_an_ignored_tmp(tmp_path):
    ckpts = tmp_path / "checkpoints"
    good = ckpts / "step-000002"
    with atomic_dir(good) as tmp:
        (tmp / "adapter_model.safetensors").write_text("old weights")
        (tmp / "trainer_state.json").write_text("{}")
    target = ckpts / "step-000004"
    # The child writes everything, then sleeps inside atomic_dir before the rename (the testing knob).
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)],
                            env={**os.environ, artifacts.SAVE_DELAY_ENV: "60"})
    tmp = ckpts / f".step-000004.tmp-{proc.pid}"
    deadline = time.time() + 60
    while not (tmp / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the save never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Everything of the new checkpoint exists, state file included, but only under the tmp name.
    assert _tree(tmp) == {"adapter_model.safetensors": "new weights", "trainer_state.json": "{}"}
    assert not target.exists()
    run = RunDir(tmp_path)
    assert run.checkpoint_dirs() == [good]
    assert clean_stale(ckpts) == [f"removed {tmp.name}"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]


def test_kill_9_replacing_a_directory_keeps_the_old_one(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_text("old weights")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(target)],
                            env={**os.environ, artifacts.SAVE_DELAY_ENV: "60"})
    tmp = tmp_path / f".adapter.tmp-{proc.pid}"
    deadline = time.time() + 60
    while not (tmp / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert _tree(target) == {"adapter_model.safetensors": "old weights"}


def test_clean_stale_puts_back_a_version_set_aside_by_a_killed_rename(tmp_path):
    # State after a kill between atomic_dir's two renames: the old version set aside, the new one not
    # yet in place. The old one must come back; a finished run must never lose its adapter.
    pid = _dead_pid()
    old = tmp_path / f".adapter.old-{pid}"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    newer = tmp_path / f".adapter.tmp-{pid}"
    newer.mkdir()
    (tmp_path / f".run.json.tmp-{pid}").write_text('{"status": "fin')  # a killed write_text
    done = clean_stale(tmp_path)
    assert f"restored adapter from .adapter.old-{pid}" in done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert _tree(tmp_path / "adapter") == {"adapter_config.json": "{}"}


def test_clean_stale_leaves_a_live_writer_and_unrelated_files_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".adapter.tmp-{live.pid}").mkdir()
        (tmp_path / ".gitignore").write_text("*")
        (tmp_path / ".notes.tmp-abc").write_text("")
        assert clean_stale(tmp_path) == []
        assert len(list(tmp_path.iterdir())) == 3
    finally:
        live.kill()
        live.wait()
    assert clean_stale(tmp_path) == [f"removed .adapter.tmp-{live.pid}"]


def test_write_text_is_atomic_and_tidy(tmp_path):
    path = tmp_path / "run.json"
    write_json(path, {"status": "running"})
    write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_checkpoint_dirs_lists_only_complete_checkpoints_in_step_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint_dirs() == []
    for step in (9, 10, 100):
        (run.checkpoints / f"step-{step:06d}").mkdir(parents=True)
        (run.checkpoints / f"step-{step:06d}" / "trainer_state.json").write_text("{}")
    (run.checkpoints / "step-000200").mkdir()  # no state file: incomplete (e.g. copied by hand, cut short)
    (run.checkpoints / ".step-000300.tmp-12345").mkdir()
    (run.checkpoints / ".step-000300.tmp-12345" / "trainer_state.json").write_text("{}")
    assert [p.name for p in run.checkpoint_dirs()] == ["step-000009", "step-000010", "step-000100"]


def test_finished_means_status_and_adapter(tmp_path):
    run = RunDir(tmp_path / "r")
    run.set_status(artifacts.FINISHED)
    assert not run.is_finished()  # no adapter (e.g. its save was killed): not finished
    (run.adapter).mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    assert run.is_finished()
    assert artifacts.latest_finished_run(tmp_path) == run
    with pytest.raises(LlamaLoraError, match="No finished run"):
        artifacts.latest_finished_run(tmp_path / "nothing")


def test_free_space_check(tmp_path):
    check_free_space(tmp_path / "not" / "yet" / "created", 1)  # walks up to an existing folder
    with pytest.raises(LlamaLoraError) as e:
        check_free_space(tmp_path, 2**62)
    msg = str(e.value)
    assert "Not enough free disk space" in msg and str(tmp_path) in msg and "MiB needed" in msg
    assert "Free some space or change output_dir" in msg
