"""Saves a kill cannot half-finish: a child process killed with kill -9 inside atomic_dir leaves the old
version and an ignored tmp, and clean_stale recovers what a killed writer left (a set-aside version put
back, a live writer's tmp left alone). The in-process atomic_dir checks are in tests/unit/test_artifacts.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from llama_lora import artifacts
from llama_lora.artifacts import RunDir, atomic_dir, clean_stale
from tests.helpers import file_tree as _tree


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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
    assert _tree(tmp) == {"adapter_model.safetensors": "new weights", "trainer_state.json": "{}",
                          artifacts.TMP_MARKER: ""}  # the marker: what clean_stale recognises as ours
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
    (newer / artifacts.TMP_MARKER).touch()  # atomic_dir's own temporary folder
    (tmp_path / f".run.json.tmp-{pid}").write_text('{"status": "fin')  # a killed write_text
    done = clean_stale(tmp_path)
    assert f"restored adapter from .adapter.old-{pid}" in done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert _tree(tmp_path / "adapter") == {"adapter_config.json": "{}"}


def test_clean_stale_leaves_a_live_writer_and_unrelated_files_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".adapter.tmp-{live.pid}").mkdir()
        (tmp_path / f".adapter.tmp-{live.pid}" / artifacts.TMP_MARKER).touch()
        (tmp_path / ".gitignore").write_text("*")
        (tmp_path / ".notes.tmp-abc").write_text("")
        assert clean_stale(tmp_path) == []
        assert len(list(tmp_path.iterdir())) == 3
    finally:
        live.kill()
        live.wait()
    assert clean_stale(tmp_path) == [f"removed .adapter.tmp-{live.pid}"]


def test_clean_stale_looks_only_at_the_names_it_would_have_made(tmp_path):
    """Someone else's `.X.tmp-PID` / `.X.old-PID` entries (a thesis draft, a settings backup) are left alone:
    only the exact names asked for are cleaned, and a temporary folder only when it carries the marker."""
    pid = _dead_pid()
    thesis = tmp_path / f".thesis.tmp-{pid}"
    thesis.mkdir()
    (thesis / "c.txt").write_text("ch1")
    (tmp_path / f".settings.old-{pid}").write_text("v1")
    unmarked = tmp_path / f".out.tmp-{pid}"  # our name, but not a folder we made
    unmarked.mkdir()
    (unmarked / "x").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert clean_stale(tmp_path, ("out",)) == []
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    (unmarked / artifacts.TMP_MARKER).touch()
    assert clean_stale(tmp_path, ("out",)) == [f"removed {unmarked.name}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([thesis.name, f".settings.old-{pid}"])
