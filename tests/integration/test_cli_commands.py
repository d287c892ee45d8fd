"""Commands through real `python -m llama_lora.cli` subprocesses, as a user runs them: exit codes and
one-paragraph errors of config loading and `validate`. The in-process checks are in tests/unit
(test_config.py, test_validate.py)."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli, validate_overrides as overrides, write_validate_data


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_validate_data(tmp_path_factory.mktemp("data"))


def test_cli_config_error_is_one_paragraph_without_traceback(tmp_path):
    proc = run_cli("train", "peft.r=0", f"output_dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2
    assert "peft.r" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # failed before anything was created


def test_cli_exit_codes(tiny_base, small_data, tmp_path):
    ok = run_cli("validate", *overrides(tiny_base, small_data))
    assert "OK: ready to train" in ok.stdout and "⟦" in ok.stdout
    bad = run_cli("validate", *overrides(tiny_base, tmp_path / "missing-data"), check=False)
    assert bad.returncode == 2
    assert "does not exist" in " ".join(bad.stderr.split())
