"""Caches are keyed by what they depend on, not by a path: eval's cached baseline (<run>/baseline.json)
is recomputed when the base model's weights or the test data change at the same path (issue 19)."""

from __future__ import annotations

import logging
import shutil

import pytest

from llama_lora import artifacts, eval as eval_cmd, runs
from llama_lora.scoring import data_fingerprint, model_fingerprint
from tests.helpers import make_run, write_validate_data

CACHED = "Using the cached baseline"


@pytest.fixture
def setup(tmp_path, tiny_base):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)  # a copy: this test rewrites its weights
    data = write_validate_data(tmp_path / "data")
    run = make_run(tmp_path / "runs", base, data=data)
    cfg = runs.saved_config(run, ["data.test_split=test", "data.max_eval_examples=4", "eval.max_new_tokens=2",
                                  "eval.num_samples=0"], "eval")
    return base, data, run, cfg


def _eval(cfg, caplog) -> tuple[dict, bool]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama_lora"):
        result = eval_cmd.run(cfg)
    return result, CACHED in caplog.text


def _perturb_weights(base) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(base)  # same path, same file names and sizes: new weights


def test_fingerprints_change_with_contents_not_paths(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n')
    before = data_fingerprint(str(f))
    assert data_fingerprint(str(f)) == before  # stable
    f.write_text('{"a": 2}\n')  # same size, new bytes
    assert data_fingerprint(str(f)) != before
    assert data_fingerprint("tatsu-lab/alpaca") == "tatsu-lab/alpaca"
    assert model_fingerprint("no-such-org/no-such-model").startswith("no-such-org/no-such-model@")
    (tmp_path / ".cache").mkdir()
    d = artifacts.fingerprint(tmp_path)
    (tmp_path / ".cache" / "lock").write_text("x")  # hidden files are not content
    assert artifacts.fingerprint(tmp_path) == d


def test_eval_recomputes_the_baseline_when_the_base_weights_change(setup, caplog):
    base, _, run, cfg = setup
    first, cached = _eval(cfg, caplog)
    assert not cached and (run / "baseline.json").is_file()
    again, cached = _eval(cfg, caplog)
    assert cached and again["baseline"]["loss"] == first["baseline"]["loss"]  # unchanged base: the cache is used

    _perturb_weights(base)
    after, cached = _eval(cfg, caplog)
    assert not cached, "a base model saved again at the same path must not reuse the old baseline"
    assert after["baseline"]["loss"] != first["baseline"]["loss"]
    assert after["settings"]["base_model"] == first["settings"]["base_model"]  # same path ...
    assert after["settings"]["base_model_fingerprint"] != first["settings"]["base_model_fingerprint"]  # ... new files
    assert artifacts.read_json(run / "baseline.json")["baseline"]["loss"] == after["baseline"]["loss"]


def test_eval_recomputes_the_baseline_when_the_test_file_changes(setup, caplog):
    _, data, _, cfg = setup
    first, _ = _eval(cfg, caplog)
    test_file = data / "test.jsonl"
    lines = test_file.read_text().splitlines(keepends=True)
    test_file.write_text("".join(lines[2:] + lines[:2]))  # other rows first: other examples scored
    after, cached = _eval(cfg, caplog)
    assert not cached
    assert after["settings"]["data"]["fingerprint"] != first["settings"]["data"]["fingerprint"]
