"""`llama-lora eval [run_dir]`: did fine-tuning help? Base vs base+adapter on the same held-out split.

Loss and perplexity over response tokens, exact match per task family when the data has checkable
answers (a `task` column, as in the embedded data set), and a few sample generations, side by side.
The baseline is computed with the adapter switched off (same model object, same settings) unless a
baseline with identical settings is already cached (`<run>/baseline.json`, or the file
`llama-lora baseline` wrote, `<output_dir>/baseline-<preset>.json`). Writes `<run>/eval.json`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llama_lora import artifacts, data as data_lib
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.evaluate import evaluate_split
from llama_lora.generation import load_for_inference, run_dir_cli

log = logging.getLogger("llama_lora.eval")


def test_split(cfg: Config):
    """The held-out split eval and baseline share, capped at data.max_eval_examples rows."""
    ds = data_lib.load_test(cfg.data, cfg.training.seed)
    return ds.select(range(min(len(ds), cfg.data.max_eval_examples)))


def settings(cfg: Config, base_model: str, fmt) -> dict:
    """Everything that changes the numbers: two results are comparable only if these are equal."""
    d = cfg.data
    return {
        "base_model": base_model,
        "data": {"source": d.source, "test_split": d.test_split, "eval_split": d.eval_split,
                 "eval_fraction": d.eval_fraction, "seed": cfg.training.seed, "columns": d.columns.model_dump(),
                 "max_eval_examples": d.max_eval_examples, "max_seq_length": d.max_seq_length},
        "prompt": fmt.to_dict(),
        "max_new_tokens": cfg.eval.max_new_tokens,
    }


def baseline_path(output_dir: str | Path, preset: str) -> Path:
    return Path(output_dir) / f"baseline-{preset}.json"


def cached_baseline(run_dir: Path, cfg: Config, wanted: dict) -> dict | None:
    for path in (run_dir / "baseline.json", baseline_path(run_dir.parent, cfg.preset)):
        if path.is_file():
            data = artifacts.read_json(path)
            if data.get("settings") == wanted:
                log.info("Using the cached baseline %s", path)
                return data["baseline"]
    return None


def run(cfg: Config) -> dict:
    loaded = load_for_inference(cfg)
    if not loaded.has_adapter:
        raise LlamaLoraError(
            f"{loaded.target} is a merged model, not a run directory: eval compares base and base+adapter, "
            "so give it the run directory (the merged model's parent) instead."
        )
    ds = test_split(cfg)
    wanted = settings(cfg, loaded.base_model, loaded.fmt)
    t0 = time.time()
    baseline = cached_baseline(loaded.target, cfg, wanted)
    if baseline is None:
        log.info("Evaluating the base model (adapter disabled) on %d examples", len(ds))
        with loaded.model.disable_adapter():
            baseline = evaluate_split(loaded.model, loaded.tokenizer, loaded.fmt, ds, cfg, loaded.device)
        artifacts.write_json(loaded.target / "baseline.json", {"settings": wanted, "baseline": baseline})
    log.info("Evaluating base + adapter on %d examples", len(ds))
    finetuned = evaluate_split(loaded.model, loaded.tokenizer, loaded.fmt, ds, cfg, loaded.device)
    result = {"run_dir": str(loaded.target), "settings": wanted, "baseline": baseline, "finetuned": finetuned,
              "seconds": round(time.time() - t0, 1)}
    artifacts.write_json(loaded.target / "eval.json", result)
    print_report(result)
    log.info("Wrote %s", loaded.target / "eval.json")
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def comparison_rows(base: dict, tuned: dict | None) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, change) rows; fine-tuned columns are empty for a baseline alone."""
    rows = []
    for key, digits in (("loss", 4), ("perplexity", 2)):
        b = base[key]
        t = tuned[key] if tuned else None
        rows.append((key, f"{b:.{digits}f}", "" if t is None else f"{t:.{digits}f}",
                     "" if t is None else f"{t - b:+.{digits}f}"))
    em_b, em_t = base.get("exact_match"), (tuned or {}).get("exact_match")
    if em_b:
        for task in [*em_b["by_task"], "overall"]:
            b = em_b["overall"] if task == "overall" else em_b["by_task"][task]
            t = None if not em_t else em_t["overall"] if task == "overall" else em_t["by_task"].get(task)
            change = "" if t is None else f"{100 * (t - b):+.1f} pts"
            label = f"exact match: {task}" + (f" (n={em_b['counts'][task]})" if task != "overall" else "")
            rows.append((label, _pct(b), _pct(t) if t is not None else "", change))
    return rows


def print_report(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 100))
    base, tuned = result["baseline"], result.get("finetuned")
    title = f"{'Evaluation' if tuned else 'Baseline'} on {base['examples']} held-out examples"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("base", justify="right")
    if tuned:
        table.add_column("fine-tuned", justify="right")
        table.add_column("change", justify="right")
    for row in comparison_rows(base, tuned):
        table.add_row(*(row if tuned else row[:2]))
    console.print(table)
    if not (base.get("samples") or (tuned or {}).get("samples")):
        return
    samples = Table(title="Sample generations", show_lines=True)
    for col in ("prompt", "reference", "base") + (("fine-tuned",) if tuned else ()):
        samples.add_column(col, overflow="fold")
    tuned_samples = (tuned or {}).get("samples") or []
    for i, s in enumerate(base.get("samples") or []):
        prompt = s["instruction"] + (f"\n{s['input']}" if s["input"] else "")
        cells = [prompt, s["reference"], repr(s["prediction"])]
        if tuned:
            cells.append(repr(tuned_samples[i]["prediction"]) if i < len(tuned_samples) else "")
        samples.add_row(*cells)
    console.print(samples)
    if not base.get("exact_match"):
        console.print("No exact match: this data set has no `task` column with checkable answers; "
                      "loss and perplexity only.")


def cli(args: list[str]) -> dict:
    return run(run_dir_cli("eval", __doc__, args))

if __name__ == "__main__":
    from llama_lora.cli import main

    main(["eval", *sys.argv[1:]])
