"""`llama-lora experiment`: run several configurations one after another, compare them, plot them.

  llama-lora experiment experiment=compare_lora_dora            a preset's named runs (its `runs:` grid)
  llama-lora experiment -m peft=lora,dora peft.r=4,8 [k=v ...]   a Hydra sweep: the cartesian product
  llama-lora experiment experiment=search_quickstart            an Optuna search (experiment.search)

Every run is an ordinary run directory, <output_dir>/<experiment name>/<run name>/, trained in this
process by train.run (and scored by eval.run when experiment.evaluate is on). Beside the runs:
summary.{csv,json,md}, eval_loss.png (all eval-loss curves on one chart), metric.png (the compared
metric per run) and plot_data.json (the plotted numbers). A run that fails is recorded with its error and
the others go on; running the same experiment again skips finished runs and redoes failed or unfinished
ones (train resumes those from their newest checkpoint).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


from llama_lora import artifacts
from llama_lora.artifacts import RunDir
from llama_lora.config.load import (compose_dict, config_diff, from_dict, load_config, load_config_file,
                                    parse_overrides)
from llama_lora.config.schema import REUSE_MAY_CHANGE, Config, SearchRange
from llama_lora.errors import LlamaLoraError
from llama_lora.report import COLUMNS, LOWER_IS_BETTER, run_name, summarize, write_tables

log = logging.getLogger("llama_lora.experiment")



def run(cfg: Config) -> dict[str, Any]:
    """Run the experiment `cfg` describes (cfg.runs, or cfg.experiment.search); return the summary."""
    exp_dir = Path(cfg.output_dir) / (cfg.experiment.name or cfg.preset)
    search = cfg.experiment.search
    if not cfg.runs and not search.n_trials:
        raise LlamaLoraError(
            "This experiment has no runs. Pick a preset (llama-lora experiment experiment=compare_lora_dora), "
            "sweep with -m (llama-lora experiment -m peft=lora,dora peft.r=4,8), or set "
            "experiment.search.n_trials and experiment.search.space for an Optuna search."
        )
    if not search.n_trials:
        _check_run_configs(cfg)  # every run's config before any run trains: a typo fails in seconds
    exp_dir.mkdir(parents=True, exist_ok=True)
    log.info("Experiment %s: %s", exp_dir,
             f"Optuna search, {search.n_trials} trials" if search.n_trials else f"{len(cfg.runs)} runs")
    rows: list[dict[str, Any]] = []
    try:
        if search.n_trials:
            if cfg.runs:
                log.warning("experiment.search is on: the %d runs in `runs` are not used", len(cfg.runs))
            _search(cfg, exp_dir, rows)
        else:
            for name, overrides in cfg.runs.items():
                run_one(cfg, exp_dir, name, overrides, rows)
                write_tables(exp_dir, rows, cfg)  # a crash or kill still leaves the summary so far
    except BaseException:  # an interrupt (train checkpointed the current run) or a bug: keep what was done
        if rows:
            write_tables(exp_dir, rows, cfg)
        raise
    return summarize(exp_dir, rows, cfg)


# ----------------------------------------------------------------------------------------------------
# One run: compose its config, skip it if already done, train, evaluate; never raise for a run's failure.


def run_one(base: Config, exp_dir: Path, name: str, overrides: list[str], rows: list) -> dict[str, Any]:
    """Train (or skip) one run and append its summary row to `rows` (first, so an interrupt keeps it)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS) | {"run": name, "overrides": " ".join(overrides),
                                                     "run_dir": str(exp_dir / name)}
    rows.append(row)
    run_dir = RunDir(exp_dir / name)
    t0, training = time.time(), False
    try:
        cfg = compose_run(base, overrides)
        cfg.output_dir, cfg.run_name = str(exp_dir), name
        if run_dir.is_finished() and not cfg.overwrite:
            changed = _config_changes(run_dir, cfg)
            if changed:  # its results stay in the summary, marked as not this configuration's
                row |= _metrics(run_dir) | {"status": "config changed", "error": changed}
                log.error("Run %s: %s", name, changed)
                return row
            row["status"] = "skipped"
            log.info("Run %s: finished earlier, skipped", name)
        else:
            log.info("Run %s: training with %s", name, overrides or "the base config")
            training = True
            _train(cfg)
            row["status"] = "finished"
        row |= _metrics(run_dir)
    except (KeyboardInterrupt, SystemExit):
        row |= {"status": "interrupted", "error": "interrupted (run the experiment again to resume)"}
        raise
    except Exception as e:  # noqa: BLE001 - the point: one broken run must not stop the others
        row |= {"status": "failed", "error": _one_line(e), "wall_time_s": round(time.time() - t0, 1)}
        if not isinstance(e, LlamaLoraError):
            log.exception("Run %s failed", name)  # unexpected (OOM, a bug): the traceback helps
        log.error("Run %s failed: %s", name, row["error"])
        if training and run_dir.status_file.is_file() and not run_dir.is_finished():
            run_dir.set_status("failed", error=row["error"])  # for infer/eval/`ls`: this run is not usable
        _free_memory()
        return row
    if base.experiment.evaluate:
        try:
            row["exact_match"] = _evaluate(cfg, run_dir, exp_dir, reuse=row["status"] == "skipped")
        except Exception as e:  # noqa: BLE001 - the run itself is fine; report the missing score
            row["error"] = f"eval failed: {_one_line(e)}"
            log.error("Run %s: evaluation failed: %s", name, row["error"])
            _free_memory()
    return row


def _check_run_configs(cfg: Config) -> None:
    """Compose and validate every run's config; refuse the experiment, naming each invalid run, before
    anything trains (a failure *during* a run is still recorded in its row while the others go on)."""
    bad = {}
    for name, overrides in cfg.runs.items():
        try:
            compose_run(cfg, overrides)
        except LlamaLoraError as e:
            bad[name] = _one_line(e)
    if bad:
        listed = "; ".join(f"run {name}: {error}" for name, error in list(bad.items())[:4])
        more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise LlamaLoraError(
            f"{len(bad)} of {len(cfg.runs)} runs of this experiment have an invalid configuration, so nothing "
            f"was trained ({listed}{more}). Fix or drop those overrides and run the same command again."
        )


def compose_run(base: Config, overrides: list[str]) -> Config:
    """`base` with a run's Hydra overrides on top, groups included (peft=dora merges conf/peft/dora.yaml)."""
    for o in parse_overrides(overrides):
        key = o.key_or_group
        if o.is_sweep_override():
            raise LlamaLoraError(f"The run override '{o.input_line}' is a sweep; a run takes single values "
                                 "(sweep with `llama-lora experiment -m ...` instead).")
        if key == "experiment" or key.startswith("experiment/"):
            raise LlamaLoraError(f"The run override '{o.input_line}' selects a preset; a run can only change "
                                 "fields and the groups model=, data=, peft=, training=.")
    return load_config(overrides, base=base.model_dump(mode="json") | {"runs": {}})


def _config_changes(run_dir: RunDir, cfg: Config) -> str:
    """Why a finished run cannot stand for `cfg` ('' when it was trained with this very configuration):
    a finished run is reused only then; otherwise it is kept, with its results, and not retrained."""
    ignore = REUSE_MAY_CHANGE
    if cfg.training.auto_batch_size or cfg.training.micro_batch_size == "auto":
        # config.yaml records the split that ran (the planner's, or the number 'auto' stands for)
        ignore += ("training.micro_batch_size", "training.gradient_accumulation_steps")
    diff = config_diff(load_config_file(run_dir.config), cfg, ignore)
    if not diff:
        return ""
    return (f"finished earlier with another configuration ({'; '.join(diff[:4])}): its results are shown as they "
            "were. Give this experiment another folder (experiment.name=...), or pass overwrite=true to retrain.")


def _train(cfg: Config) -> None:
    from llama_lora import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _reset_for_next_run()
    try:
        train.run(cfg)
    finally:
        # train restores these itself when it ends normally; after an exception its handler would stay.
        for s, h in handlers.items():
            signal.signal(s, h)
        # train logs into the run's train.log; later runs and the summary must not.
        logger = logging.getLogger("llama_lora")
        for h in [h for h in logger.handlers if getattr(h, "_llama_lora_run_log", False)]:
            logger.removeHandler(h)
            h.close()


def _reset_for_next_run() -> None:
    """Each run measures its own peak memory and builds its own accelerate state."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the process's peak RSS, which train reports as peak memory on CPU
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # never tear down a real distributed group
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _require(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LlamaLoraError(f"{purpose} needs the '{module}' package, which is not installed: "
                             f"pip install {module} (or pip install -e '.[dev]').") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return text if isinstance(e, LlamaLoraError) else f"{type(e).__name__}: {text[:500]}"


def _metrics(run_dir: RunDir) -> dict[str, Any]:
    m = artifacts.read_json(run_dir.metrics)
    keys = ("train_loss", "eval_loss", "trainable_params", "tokens_per_second", "peak_memory_mb", "wall_time_s")
    return {k: m.get(k) for k in keys}


def _evaluate(cfg: Config, run_dir: RunDir, exp_dir: Path, reuse: bool) -> float | None:
    """Exact match (overall) from the eval command; a skipped run's eval.json is reused if its settings match."""
    from llama_lora import eval as eval_cmd

    eval_file = run_dir.path / "eval.json"
    result = artifacts.read_json(eval_file) if reuse and eval_file.is_file() else None
    # Reused only if scored with everything that changes the numbers as now, base weights and data files included.
    if result and result.get("settings") != _eval_settings(cfg, run_dir):
        result = None
    if result is None:
        eval_cfg = cfg.model_copy(deep=True)
        eval_cfg.infer.run_dir = str(run_dir.path)
        result = eval_cmd.run(eval_cfg)
        # The base model scores the same for every run of the experiment: eval reads this file (when the
        # settings match) instead of evaluating the base model again for each run.
        shared = eval_cmd.baseline_path(exp_dir, cfg.preset)
        if not shared.is_file():
            artifacts.write_json(shared, {"settings": result["settings"], "baseline": result["baseline"]})
    em = (result.get("finetuned") or {}).get("exact_match")
    return em["overall"] if em else None


def _eval_settings(cfg: Config, run_dir: RunDir) -> dict | None:
    """The settings `eval` of this run would record now (scoring.settings), without loading the model."""
    from llama_lora import runs
    from llama_lora.data import PromptFormat
    from llama_lora.scoring import settings

    if not run_dir.prompt.is_file():
        return None
    return settings(cfg, runs.base_model_of(run_dir.path, cfg), PromptFormat(**artifacts.read_json(run_dir.prompt)))


# ----------------------------------------------------------------------------------------------------
# Search: Optuna's ask/tell loop, one run per trial. search.json records each trial's parameters before
# it runs, so a re-run replays them: finished trials are told to the study without training, failed or
# unfinished ones run again, then new trials fill the budget.


def _search(cfg: Config, exp_dir: Path, rows: list[dict[str, Any]]) -> None:
    optuna = _require("optuna", "the Optuna search (experiment.search)")

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines already narrate each trial
    sc = cfg.experiment.search
    metric = _search_metric(cfg)
    distributions = {key: distribution(space) for key, space in sc.space.items()}
    state_file = exp_dir / "search.json"
    trials = artifacts.read_json(state_file)["trials"] if state_file.is_file() else []
    # A continued search must not replay the fresh sampler's first draws: offset the seed by the trials done.
    seed = sc.seed + len(trials)
    sampler = (optuna.samplers.TPESampler(seed=seed) if sc.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(direction="minimize" if LOWER_IS_BETTER[metric] else "maximize", sampler=sampler)
    for t in trials:
        if set(t["params"]) != set(distributions):
            raise LlamaLoraError(
                f"{exp_dir} holds a search over {sorted(t['params'])}, not {sorted(distributions)}. Give this "
                "search another folder (experiment.name=...) or remove the old one."
            )
    log.info("Search: %d trials, optimising %s (%s)", sc.n_trials, metric, study.direction.name.lower())

    def record() -> None:
        artifacts.write_json(state_file, {"metric": metric, "direction": study.direction.name.lower(),
                                          "space": {k: _space_json(v) for k, v in sc.space.items()}, "trials": trials})

    def run_trial(name: str, params: dict[str, Any], trial=None) -> None:
        row = run_one(cfg, exp_dir, name, [f"{k}={_override_value(v)}" for k, v in params.items()], rows)
        write_tables(exp_dir, rows, cfg)
        value = row.get(metric)
        ok = row["status"] in ("finished", "skipped") and value is not None
        if trial is not None and ok:
            study.tell(trial, value)
        elif trial is not None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            try:
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions=distributions, value=value if ok else None,
                    state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL))
            except ValueError as e:  # a recorded value outside the (changed) space
                raise LlamaLoraError(f"Trial {name} in {state_file} does not fit the search space ({e}). Give "
                                     "this search another folder (experiment.name=...).") from e

    for t in trials:  # replay: skipped if finished, trained again if failed or unfinished
        run_trial(t["run"], t["params"])
    while len(trials) < sc.n_trials:
        trial = study.ask(distributions)
        params = {k: _round(v, distributions[k]) for k, v in trial.params.items()}
        trials.append({"run": f"trial-{len(trials):03d}", "params": params})
        record()  # before training: a killed trial is resumed with the same parameters
        run_trial(trials[-1]["run"], params, trial)
    record()


def _search_metric(cfg: Config) -> str:
    """The objective must be fixed before the first trial: 'auto' looks at the data for checkable answers."""
    metric = cfg.experiment.metric
    if metric != "auto":
        if metric == "exact_match" and not cfg.experiment.evaluate:
            raise LlamaLoraError("experiment.metric=exact_match needs experiment.evaluate=true (eval computes it).")
        return metric
    if cfg.experiment.evaluate:
        try:
            from llama_lora.scoring import held_out_split

            if "task" in held_out_split(cfg).column_names:
                return "exact_match"
        except Exception as e:  # noqa: BLE001 - the runs will report a data problem themselves
            log.warning("Could not inspect the test split (%s); optimising eval_loss", _one_line(e))
    return "eval_loss"


def distribution(space: list | SearchRange):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(space, list):
        return CategoricalDistribution(space)
    if space.is_int:
        return IntDistribution(int(space.low), int(space.high), log=space.log, step=int(space.step or 1))
    return FloatDistribution(float(space.low), float(space.high), log=space.log, step=space.step)


def _round(value: Any, dist) -> Any:
    """Continuous floats to 4 significant digits: readable overrides (lr=0.001605), same results."""
    from optuna.distributions import FloatDistribution

    if isinstance(dist, FloatDistribution) and dist.step is None:
        return min(max(float(f"{value:.4g}"), dist.low), dist.high)
    return value


def _space_json(space: list | SearchRange) -> Any:
    return space if isinstance(space, list) else space.model_dump()


def _override_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return str(v)


# ----------------------------------------------------------------------------------------------------
# The command line: -m turns sweep syntax (a,b / range() / interval()) into runs or a search space.


def sweep_runs(sweeps: list) -> dict[str, list[str]]:
    """Cartesian product of Hydra sweep overrides -> {run name: overrides}, as Hydra's basic sweeper does."""
    axes = []
    for o in sweeps:
        if o.value_type.name == "INTERVAL_SWEEP":
            raise LlamaLoraError(f"'{o.input_line}' is an interval: it needs a search. Add "
                                 "experiment.search.n_trials=N to sample N runs from it with Optuna.")
        key = o.get_key_element()
        axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
    return {run_name(combo): list(combo) for combo in itertools.product(*axes)}


def sweep_space(sweeps: list) -> dict[str, Any]:
    """Sweep overrides -> a search space: a,b / choice() / range() are categorical, interval() a range."""
    space = {}
    for o in sweeps:
        key, v = o.get_key_element().lstrip("+"), o.value()
        if o.value_type.name == "INTERVAL_SWEEP":
            space[key] = {"low": v.start, "high": v.end, "log": "log" in v.tags}
        else:
            space[key] = list(o.sweep_iterator())
    return space


def build_config(overrides: list[str], multirun: bool = False) -> Config:
    """The experiment's config from command-line overrides: with `multirun`, sweep overrides become runs
    (one per combination, times the preset's runs) or, with experiment.search.n_trials, the search space."""
    parsed = parse_overrides(overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise LlamaLoraError(f"{[o.input_line for o in sweeps]} sweep over several values: add -m "
                             "(llama-lora experiment -m ...) to run one configuration per combination.")
    data = compose_dict([o.input_line for o in parsed if not o.is_sweep_override()])
    search = data["experiment"]["search"]
    if sweeps and search["n_trials"]:  # before validation, which wants a space when n_trials > 0
        search["space"] = (search["space"] or {}) | sweep_space(sweeps)
    cfg = from_dict(data)
    if multirun and not sweeps and not cfg.runs and not cfg.experiment.search.n_trials:
        cfg.runs = {"base": []}  # as in Hydra, a multirun without sweep values is one run
    if sweeps and not cfg.experiment.search.n_trials:
        grid = sweep_runs(sweeps)
        # With a preset's runs too: every preset run x every sweep combination.
        cfg.runs = ({f"{p},{s}": po + so for p, po in cfg.runs.items() for s, so in grid.items()}
                    if cfg.runs else grid)
    return cfg


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["experiment", *sys.argv[1:]])
