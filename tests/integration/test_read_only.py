"""Issue 19 kind 5: commands on a run that sits on a read-only file system, through the real CLI.

A read-only bind mount in a private mount namespace (`unshare -rm`: no root needed, nothing to clean
up, the rest of the machine never sees it). eval, baseline and merge write into the run, so each
stops before any work with one paragraph saying to copy the run; infer only reads, so it answers.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import error_paragraph, make_run, write_validate_data


def _can_mount_read_only(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f"mount --bind {probe} {probe} && mount -o remount,ro,bind {probe} {probe} && ! touch {probe}/x"
    return subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True).returncode == 0


def _read_only(folder, *argv: str) -> subprocess.CompletedProcess:
    """`llama-lora argv` with `folder` mounted read-only."""
    cli = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "llama_lora.cli", *argv])
    f = shlex.quote(str(folder))
    script = f"mount --bind {f} {f} && mount -o remount,ro,bind {f} && exec {cli}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("read_only")
    if not _can_mount_read_only(root):
        pytest.skip("needs `unshare -rm` and bind mounts (a private mount namespace) to make a read-only folder")
    return make_run(root / "outputs", tiny_base, data=write_validate_data(root / "data"))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command", ["eval", "baseline", "merge"])
def test_a_command_that_writes_into_a_read_only_run_stops_at_once_and_says_to_copy_it(run, command):
    before = _snapshot(run)
    proc = _read_only(run, command, str(run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = error_paragraph(proc.stderr)
    for words in (f"Cannot write into the run folder {run} (Read-only file system)", f"llama-lora {command}",
                  f"cp -r {run}", "before any work"):
        assert words in message, message
    assert "disk space" not in message
    assert "Loaded" not in proc.stderr  # refused before the model was loaded
    assert _snapshot(run) == before  # (the lock file beside it, in the writable output_dir, is expected)


def test_a_read_only_output_dir_names_the_lock_and_the_copy(run):
    proc = _read_only(run.parent, "eval", str(run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_paragraph(proc.stderr)
    assert "Cannot write to the output directory" in message and "run lock" in message, message
    assert f"cp -r {run}" in message and "output_dir" not in message.split("run lock")[1], message


def test_infer_reads_a_read_only_run(run):
    proc = _read_only(run, "infer", f"infer.run_dir={run}", "infer.max_new_tokens=4", "Uppercase the word.")
    assert proc.returncode == 0 and "error:" not in proc.stderr, proc.stderr[-3000:]
