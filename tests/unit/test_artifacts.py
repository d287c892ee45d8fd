"""The run-folder contract: atomic saves that replace a whole folder or nothing, the checkpoint listing
resume trusts, and the free-space guard. Saves killed by a real kill -9 and stale-file recovery after
one (child processes) are in tests/integration/test_killed_saves.py."""

from __future__ import annotations

import os

import pytest

from llama_lora import artifacts
from llama_lora.artifacts import RunDir, atomic_dir, check_free_space, write_json, write_text
from llama_lora.errors import LlamaLoraError
from tests.helpers import file_tree as _tree


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


# ---- one writer per run: the run lock (a second process is in tests/integration/test_run_lock.py)


def test_run_lock_refuses_a_second_writer_and_names_the_first(tmp_path):
    run = RunDir(tmp_path / "out" / "dup")
    with run.lock("train") as first:
        assert first.held and run.lock_file == tmp_path / "out" / ".dup.lock"
        assert not run.path.exists()  # beside the run folder: nothing is created in it
        # A second open file description, in this very process: flock refuses it as it would another process.
        with pytest.raises(LlamaLoraError) as e:
            run.lock("merge")
        msg = str(e.value)
        assert f"Run directory {run.path} is in use by another llama-lora process" in msg
        assert f"(pid {os.getpid()}, `train`, since " in msg and "choose another run_name=" not in msg
        assert "then run `merge` again" in msg
        with pytest.raises(LlamaLoraError, match="choose another run_name="):
            run.lock("train")
    assert not first.held
    with run.lock("eval"):  # released: the next writer gets it
        pass
    first.release()  # releasing twice is harmless


def test_run_lock_survives_overwrite_and_leaves_the_run_folder_contract_alone(tmp_path):
    run = RunDir(tmp_path / "dup")
    run.path.mkdir()
    write_json(run.status_file, {"status": "finished"})
    (run.adapter).mkdir()
    write_json(run.adapter / "adapter_config.json", {})
    with run.lock("train"):
        run.prepare_for_training(overwrite=True, resume="auto")  # rmtree's the folder; the lock is outside
        # the replaced folder starts as llama-lora's own: a run.json saying it is running, nothing else
        assert run.lock_file.is_file() and sorted(p.name for p in run.path.iterdir()) == ["run.json"]
        assert run.is_owned() and run.status()["status"] == "running"
        with pytest.raises(LlamaLoraError, match="in use by another llama-lora process"):
            run.lock("train")
    assert artifacts.clean_stale(tmp_path) == [] and run.lock_file.is_file()  # not a stale save: kept
    with pytest.raises(LlamaLoraError, match="No finished run"):
        artifacts.latest_finished_run(tmp_path)


def test_run_lock_in_an_unwritable_place_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(LlamaLoraError, match="Cannot write to the output directory"):
        RunDir(tmp_path / "a_file" / "sub" / "run").lock("train")
