"""`llama-lora experiment`: grids, sweeps, failures, re-runs and Optuna search, with real (tiny) training.

The slow tests train the 2-step tiny base for a few steps on a small slice of the embedded data
generator's records (with their `task` column, so exact match is computed): the mechanics are what is
checked here, not the quality of the runs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import pytest
from PIL import Image

from llama_lora import experiment
from llama_lora.config.load import load_config, load_config_file
from llama_lora.errors import LlamaLoraError
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from llama_lora.embedded.data import generate_splits, write_jsonl

    out = tmp_path_factory.mktemp("data")
    write_jsonl(generate_splits(n_train=160, n_validation=16, n_test=16), out)
    return out


def tiny_overrides(tiny_base, data, out) -> list[str]:
    return [f"model.name_or_path={tiny_base}", f"data.source={data}", "data.train_split=train",
            "data.max_seq_length=128", "data.max_eval_examples=12", "training.max_steps=4",
            "training.micro_batch_size=8", "training.gradient_accumulation_steps=1", "training.eval_every=2",
            "training.save_every=0", "training.log_every=1", "eval.max_new_tokens=6", "eval.batch_size=12",
            "eval.num_samples=0", f"output_dir={out}"]


# ---- fast: parsing and composition, no training


def test_sweep_expands_to_the_cartesian_product():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["peft=lora,dora", "peft.r=4,8", "training.seed=range(1,3)"])
    runs = experiment.sweep_runs(parsed)
    assert len(runs) == 8
    assert runs["peft=dora,peft.r=8,training.seed=2"] == ["peft=dora", "peft.r=8", "training.seed=2"]
    space = experiment.sweep_space(OverridesParser.create().parse_overrides(
        ["peft.r=4,8", "training.learning_rate=tag(log,interval(1e-4,1e-2))"]))
    assert space == {"peft.r": [4, 8], "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}


def test_run_overrides_land_on_the_preset_groups_included():
    base = load_config(["experiment=compare_lora_dora", "peft.r=12", "training.max_steps=7"])
    assert list(base.runs) == ["lora-r4", "lora-r16", "dora-r4", "dora-r16"] and base.experiment.evaluate
    cfg = experiment.compose_run(base, ["peft=dora", "peft.alpha=8"])
    # the group's YAML (method: dora) on top of the preset; the preset's other values are kept
    assert (cfg.peft.method, cfg.peft.r, cfg.peft.alpha) == ("dora", 12, 8.0)
    assert cfg.training.max_steps == 7 and cfg.model.name_or_path == "embedded" and cfg.runs == {}
    with pytest.raises(LlamaLoraError, match=r"peft.r = 0 is invalid"):
        experiment.compose_run(base, ["peft.r=0"])
    with pytest.raises(LlamaLoraError, match="sweep"):
        experiment.compose_run(base, ["peft.r=4,8"])


@pytest.mark.parametrize("preset", ["compare_lora_dora", "search_quickstart"])
def test_shipped_presets_compose_every_run(preset):
    base = load_config([f"experiment={preset}"])
    # short runs: at most the quickstart's own length (a comparison must still show what each run learnt)
    assert base.training.max_steps <= load_config(["experiment=quickstart"]).training.max_steps
    for name, overrides in base.runs.items():
        cfg = experiment.compose_run(base, overrides)
        assert f"peft.r={cfg.peft.r}" in overrides and name.startswith(cfg.peft.method)
    space = base.experiment.search.space
    assert bool(base.runs) != bool(base.experiment.search.n_trials)  # a grid or a search
    assert all(experiment.distribution(v) for v in space.values())  # a valid Optuna space


def test_refuses_a_sweep_without_m_and_an_empty_experiment():
    with pytest.raises(LlamaLoraError, match="add -m"):
        experiment.build_config(["peft.r=4,8"])
    with pytest.raises(LlamaLoraError, match="has no runs"):
        experiment.run(experiment.build_config([]))
    with pytest.raises(LlamaLoraError, match="needs a search"):
        experiment.build_config(["training.learning_rate=interval(1e-4,1e-2)"], multirun=True)


# ---- slow: real runs


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_base, small_data):
    """A two-run experiment (LoRA vs DoRA), evaluated, run once for the module."""
    out = tmp_path_factory.mktemp("exp")
    cfg = load_config([*tiny_overrides(tiny_base, small_data, out), "experiment.name=grid", "experiment.evaluate=true",
                       "+runs.lora=['peft=lora','peft.r=4']", "+runs.dora=['peft=dora','peft.r=4']"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = experiment.run(cfg)
    return cfg, summary, printed.getvalue(), out / "grid"


@pytest.mark.slow
def test_two_run_experiment_writes_table_files_and_plots(grid):
    cfg, summary, printed, exp_dir = grid
    rows = {r["run"]: r for r in summary["runs"]}
    assert list(rows) == ["lora", "dora"] and all(r["status"] == "finished" for r in rows.values()), rows
    for name, r in rows.items():
        metrics = json.loads((exp_dir / name / "metrics.json").read_text())
        assert r["eval_loss"] == metrics["eval_loss"] and r["train_loss"] == metrics["train_loss"]
        assert r["trainable_params"] == metrics["trainable_params"] > 0
        assert r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 and r["wall_time_s"] > 0
        em = json.loads((exp_dir / name / "eval.json").read_text())["finetuned"]["exact_match"]["overall"]
        assert r["exact_match"] == em and 0.0 <= em <= 1.0
        assert load_config_file(exp_dir / name / "config.yaml").peft.method == name  # each run its own config
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]  # DoRA adds magnitude vectors
    # the base model was scored once and shared: eval writes <run>/baseline.json only when it scores it itself
    assert (exp_dir / "baseline-default.json").is_file()
    assert (exp_dir / "lora" / "baseline.json").is_file() and not (exp_dir / "dora" / "baseline.json").exists()

    # the printed table, and the same rows in CSV, JSON and Markdown
    assert "Experiment grid" in printed and "lora" in printed and "dora" in printed and "finished" in printed
    with open(exp_dir / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["lora", "dora"] and tuple(table[0]) == experiment.COLUMNS
    assert float(table[1]["eval_loss"]) == pytest.approx(rows["dora"]["eval_loss"])
    assert json.loads((exp_dir / "summary.json").read_text())["runs"] == summary["runs"]
    md = (exp_dir / "summary.md").read_text()
    assert "| lora | finished | peft=lora peft.r=4 |" in md and "| dora | finished |" in md
    assert summary["metric"] == "exact_match" and summary["best"] in rows

    # two valid PNGs; the loss chart holds one series per run, each point an eval of that run
    for png in ("eval_loss.png", "metric.png"):
        with Image.open(exp_dir / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    plotted = json.loads((exp_dir / "plot_data.json").read_text())
    assert set(plotted["eval_loss"]) == {"lora", "dora"}
    for name, series in plotted["eval_loss"].items():
        assert series["steps"] == [0, 2, 4]  # before training, eval_every=2, the end
        assert series["values"][-1] == pytest.approx(rows[name]["eval_loss"])
    assert plotted["metric"] == {"name": "exact_match", "values": {n: rows[n]["exact_match"] for n in rows}}


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_failed_ones(grid):
    cfg, _, _, exp_dir = grid
    # Simulate a crash of "dora" after it was trained: its status no longer says finished.
    status = json.loads((exp_dir / "dora" / "run.json").read_text())
    (exp_dir / "dora" / "run.json").write_text(json.dumps(status | {"status": "failed", "error": "crash"}))
    watched = [exp_dir / "lora" / f for f in ("metrics.json", "eval.json", "adapter/adapter_model.safetensors")]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    dora_before = {f: os.stat(exp_dir / "dora" / f).st_mtime_ns for f in ("metrics.json", "eval.json")}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        summary = experiment.run(cfg)
    assert {r["run"]: r["status"] for r in summary["runs"]} == {"lora": "skipped", "dora": "finished"}
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before  # no repeated work for the finished run
    for f, mtime in dora_before.items():  # the failed one was trained and evaluated again
        assert os.stat(exp_dir / "dora" / f).st_mtime_ns > mtime, f
    lora = next(r for r in summary["runs"] if r["run"] == "lora")
    assert lora["eval_loss"] is not None and lora["exact_match"] is not None  # read back from its files
    assert "skipped" in printed.getvalue()
    assert [r["status"] for r in csv.DictReader(open(exp_dir / "summary.csv"))] == ["skipped", "finished"]


@pytest.mark.slow
def test_rerun_with_a_changed_setting_keeps_the_finished_results(grid):
    """A finished run trained with other settings is neither retrained nor called failed: the summary keeps
    its results, with status 'config changed' and what changed."""
    cfg, _, _, exp_dir = grid
    lora_metrics = json.loads((exp_dir / "lora" / "metrics.json").read_text())
    changed = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 5})})
    mtime = os.stat(exp_dir / "lora" / "adapter" / "adapter_model.safetensors").st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):
        summary = experiment.run(changed)
    rows = {r["run"]: r for r in summary["runs"]}
    assert {n: r["status"] for n, r in rows.items()} == {"lora": "config changed", "dora": "config changed"}
    assert rows["lora"]["eval_loss"] == lora_metrics["eval_loss"]  # its results stay in the summary
    assert "training.max_steps" in rows["lora"]["error"] and "overwrite=true" in rows["lora"]["error"]
    assert os.stat(exp_dir / "lora" / "adapter" / "adapter_model.safetensors").st_mtime_ns == mtime
    assert "| lora | config changed |" in (exp_dir / "summary.md").read_text()


def test_a_sweep_with_an_invalid_run_trains_nothing(tmp_path, tiny_base, small_data):
    """peft.r=0 is invalid: every run's config is checked before any run trains (issue 19, kind 7)."""
    proc = run_cli("experiment", "-m", "peft.r=4,0", *tiny_overrides(tiny_base, small_data, tmp_path),
                   "experiment.evaluate=false", check=False)
    err = " ".join(proc.stderr.split())  # the paragraph as one line (the CLI wraps it at 100 columns)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in err
    assert "1 of 2 runs of this experiment have an invalid configuration, so nothing was trained" in err
    assert "run peft.r=0: Invalid configuration: peft.r = 0 is invalid" in err
    assert not (tmp_path / "default").exists()  # no run folder, no summary: nothing started


@pytest.mark.slow
def test_sweep_with_broken_runs_finishes_the_others(tmp_path, tiny_base, small_data):
    # debug_nan_at_step=3 fails *during* training: recorded in its row, the other run goes on.
    proc = run_cli("experiment", "-m", "peft.r=4", "training.debug_nan_at_step=null,3",
                   *tiny_overrides(tiny_base, small_data, tmp_path), "experiment.evaluate=false", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "1 of 2 runs failed" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    rows = {r["run"]: r for r in summary["runs"]}
    ok = rows["training.debug_nan_at_step=null"]
    assert ok["status"] == "finished" and ok["eval_loss"] is not None and not ok["error"]
    nan = rows["training.debug_nan_at_step=3"]
    assert nan["status"] == "failed" and "loss became nan at step 3" in nan["error"]
    assert json.loads((tmp_path / "default" / nan["run"] / "run.json").read_text())["status"] == "failed"
    assert "| failed |" in (tmp_path / "default" / "summary.md").read_text()
    assert list(json.loads((tmp_path / "default" / "plot_data.json").read_text())["eval_loss"]) == [ok["run"]]


@pytest.mark.slow
def test_optuna_search_runs_trials_and_continues(tmp_path, tiny_base, small_data):
    # -m with a search budget: the sweep values become the search space (categorical; log-scale interval)
    args = ["peft.r=2,4", "training.learning_rate=tag(log,interval(1e-3,1e-2))",
            *tiny_overrides(tiny_base, small_data, tmp_path), "training.max_steps=2", "experiment.name=search",
            "experiment.evaluate=false", "experiment.search.n_trials=2", "experiment.search.sampler=random"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = experiment.run(experiment.build_config(args, multirun=True))
    exp_dir = tmp_path / "search"
    trials = json.loads((exp_dir / "search.json").read_text())["trials"]
    assert [t["run"] for t in trials] == ["trial-000", "trial-001"]
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
    for t in trials:  # each trial trained with the parameters the sampler chose
        cfg = load_config_file(exp_dir / t["run"] / "config.yaml")
        assert cfg.peft.r == t["params"]["peft.r"] in (2, 4)
        assert cfg.training.learning_rate == t["params"]["training.learning_rate"]
        assert 1e-3 <= cfg.training.learning_rate <= 1e-2
    best = min(summary["runs"], key=lambda r: r["eval_loss"])
    assert summary["metric"] == "eval_loss" and summary["best"] == best["run"]

    # A bigger budget later: the two finished trials are skipped, one new trial runs.
    mtime = os.stat(exp_dir / "trial-000" / "metrics.json").st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):
        summary = experiment.run(experiment.build_config([*args, "experiment.search.n_trials=3"], multirun=True))
    assert [r["status"] for r in summary["runs"]] == ["skipped", "skipped", "finished"]
    assert os.stat(exp_dir / "trial-000" / "metrics.json").st_mtime_ns == mtime
    assert len(json.loads((exp_dir / "search.json").read_text())["trials"]) == 3
