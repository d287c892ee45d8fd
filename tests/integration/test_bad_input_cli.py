"""Bad input through real `python -m llama_lora.cli` subprocesses, as a user runs it: exit 2, one
paragraph naming the problem and the fix, no traceback unless --debug. The whole table runs in-process
in tests/unit/test_bad_input.py; the cases and their broken world are shared through tests.helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_lora import cli
from tests.helpers import (
    BAD_INPUT_CASES as CASES, BAD_INPUT_IN_SUBPROCESS as IN_SUBPROCESS, BAD_INPUT_TRAIN as TRAIN,
    bad_input_argv as _argv, build_bad_input_world, error_paragraph as _paragraph, run_cli,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base) -> Path:
    """The broken world the cases point at, built once."""
    return build_bad_input_world(tmp_path_factory.mktemp("bad_input"), tiny_base)


@pytest.mark.parametrize("case_id", IN_SUBPROCESS)
def test_bad_input_through_a_real_subprocess(case_id, world, tiny_base):
    case = next(c for c in CASES if c.id == case_id)
    if case.argv[0] not in cli.COMMANDS:
        pytest.skip(f"no {case.argv[0]} command yet")
    argv = _argv(case, tiny_base, world)
    argv = [a.replace(f"run_name={case.id}", f"run_name={case.id}-sub") for a in argv]
    proc = run_cli(*argv, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = _paragraph(proc.stderr)
    for word in case.expect:
        assert word in message, f"{word!r} not in: {message}"


def test_debug_flag_shows_the_traceback(world, tiny_base):
    argv = ["train", *[a.format(base=tiny_base, w=world) for a in TRAIN], "run_name=debug",
            "data.source=/nonexistent/data.jsonl", "--debug"]
    proc = run_cli(*argv, check=False, timeout=120)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "LlamaLoraError" in proc.stderr
    assert "'/nonexistent/data.jsonl' does not exist" in _paragraph(proc.stderr)


def test_lean_kernel_required_without_gcc_fails_before_anything(world, tiny_base, tmp_path):
    """peft.lean_kernel=true where the CPU kernel cannot be built (no gcc on PATH): one paragraph naming
    the field, why and the fix, before a run directory or a model exists."""
    argv = ["train", *[a.format(base=tiny_base, w=world) for a in TRAIN], "run_name=kernel", "peft.lean_kernel=true"]
    proc = run_cli(*argv, check=False, timeout=120, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = _paragraph(proc.stderr)
    for word in ("peft.lean_kernel=true", "no gcc on PATH", "peft.lean_kernel=auto"):
        assert word in message, message
    assert not (world / "out" / "kernel").exists()
