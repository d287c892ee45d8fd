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

from llama_lora import artifacts, runs
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.scoring import evaluate_split, held_out_split, print_report, settings

log = logging.getLogger("llama_lora.eval")


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
    # One writer per run while baseline.json/eval.json are written: an eval of a run that a train
    # (overwrite=true) or merge is writing is refused, and they refuse meanwhile.
    with runs.writing_into(cfg, "eval") as pinned:
        return _evaluate(pinned)


def _evaluate(cfg: Config) -> dict:
    loaded = runs.load(cfg)
    if not loaded.has_adapter:
        raise LlamaLoraError(
            f"{loaded.target} is a merged model, not a run directory: eval compares base and base+adapter, "
            "so give it the run directory (the merged model's parent) instead."
        )
    ds = held_out_split(cfg)
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


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["eval", *sys.argv[1:]])
