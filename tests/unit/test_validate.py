"""validate: every check on a good config, and each problem the issue names reported as a failure."""

from __future__ import annotations

import json

import pytest

from llama_lora import validate
from llama_lora.config.load import load_config
from llama_lora.errors import LlamaLoraError
from tests.helpers import validate_overrides as overrides, write_validate_data


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_validate_data(tmp_path_factory.mktemp("data"))


def statuses(report):
    return {c.name: c.status for c in report.checks}


def test_good_config_passes_every_check(tiny_base, small_data):
    report = validate.check(load_config(overrides(tiny_base, small_data)))
    st = statuses(report)
    assert not report.problems, report.checks
    for name in ("model", "pad token", "target modules", "memory", "data", "eos in labels", "pad != eos",
                 "no fully masked example", "truncated", "inference prompt"):
        assert st[name] == validate.OK, (name, report.checks)
    # Rendered examples: the prompt is masked, the answer and its <|eot_id|> are trained.
    shown = report.examples[0].plain
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n⟦" in shown and shown.endswith("<|eot_id|>⟧")
    assert "GiB" in report.memory or "MiB" in report.memory


def test_missing_model_path(tmp_path, small_data):
    report = validate.check(load_config(overrides(tmp_path / "no-model", small_data)))
    st = statuses(report)
    assert st["model"] == validate.FAIL and "does not exist" in next(c.detail for c in report.checks if c.name == "model")
    assert st["target modules"] == st["memory"] == validate.SKIP


def test_unknown_target_module_and_over_budget(tiny_base, small_data):
    cfg = load_config(overrides(tiny_base, small_data, "peft.target_modules=[q_proj,qkv_proj]",
                                "training.memory_budget_gb=0.05"))
    report = validate.check(cfg)
    problems = {c.name: c.detail for c in report.problems}
    assert set(problems) == {"target modules", "memory"}
    assert "['qkv_proj']" in problems["target modules"] and "q_proj" in problems["target modules"]
    assert "0.05 GiB" in problems["memory"] and "micro_batch_size" in problems["memory"]
    with pytest.raises(LlamaLoraError, match="validate found 2 problem"):
        validate.run(cfg)


def test_hub_model_offline_says_how_to_log_in(small_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no cached token either
    report = validate.check(load_config([f"data.source={small_data}", "data.train_split=train"]))
    model = next(c for c in report.checks if c.name == "model")
    assert model.status == validate.FAIL
    assert "meta-llama/Llama-3.2-1B-Instruct" in model.detail and "could not be reached" in model.detail
    assert "huggingface-cli login" in model.detail and "experiment=quickstart" in model.detail


def test_preflight_flags_truncation_and_fully_masked_examples(tiny_base, tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 8
    rows += [{"instruction": "Long " * 40, "input": "", "output": "answer"}] * 2  # prompt alone > 64 tokens
    rows += [{"instruction": "Short.", "input": "", "output": "x" * 80}]  # the answer is cut, eos lost
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate.check(load_config(overrides(tiny_base, tmp_path, "data.max_seq_length=64")))
    st = {c.name: c for c in report.checks}
    assert st["no fully masked example"].status == validate.WARN and "2 examples" in st["no fully masked example"].detail
    assert st["truncated"].status == validate.WARN and "3 of 11 rows" in st["truncated"].detail
    assert st["eos in labels"].status == validate.OK  # the truncated answer legitimately lost its eos
