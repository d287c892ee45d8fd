"""`llama-lora baseline [run_dir] [overrides]`: how good is the base model, before any fine-tuning?

Evaluates the base model (no adapter) on the held-out split with exactly what `eval` uses (same split,
cap, prompt format, generation length), and writes `<output_dir>/baseline-<preset>.json`, which
`eval` reuses when its settings match. With a run directory (`run_dir=...` or infer.run_dir=...) it
evaluates that run's base with the run's saved settings and writes `<run>/baseline.json`.
"""

from __future__ import annotations

import logging
import sys

from llama_lora import artifacts, runs
from llama_lora.config.schema import Config
from llama_lora.eval import baseline_path
from llama_lora.scoring import evaluate_split, held_out_split, print_report, settings

log = logging.getLogger("llama_lora.baseline")


def run(cfg: Config) -> dict:
    if cfg.infer.run_dir is None:  # the configured base: writes <output_dir>/baseline-<preset>.json
        return _baseline(cfg)
    with runs.writing_into(cfg, "baseline") as pinned:  # one writer per run while <run>/baseline.json is written
        return _baseline(pinned)


def _baseline(cfg: Config) -> dict:
    if cfg.infer.run_dir is not None:
        loaded = runs.load(cfg, adapter=False)  # the run's base, tokenizer and prompt format
        out = loaded.target / "baseline.json"
    else:
        loaded = runs.load_base(cfg)
        out = baseline_path(cfg.output_dir, cfg.preset)
    ds = held_out_split(cfg)
    log.info("Evaluating the base model %s on %d examples", loaded.base_model, len(ds))
    metrics = evaluate_split(loaded.model, loaded.tokenizer, loaded.fmt, ds, cfg, loaded.device)
    result = {"settings": settings(cfg, loaded.base_model, loaded.fmt), "baseline": metrics}
    artifacts.write_json(out, result)
    print_report(result)
    log.info("Wrote %s", out)
    return result


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["baseline", *sys.argv[1:]])
