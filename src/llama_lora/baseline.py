"""`llama-lora baseline [overrides]`: how good is the base model, before any fine-tuning?

Evaluates the base model (no adapter) on the held-out split with exactly what `eval` uses (same split,
cap, prompt format, generation length), and writes `<output_dir>/baseline-<preset>.json`, which
`eval` reuses when its settings match. With a run directory (`run_dir=...` or infer.run_dir=...) it
evaluates that run's base with the run's saved settings and writes `<run>/baseline.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llama_lora import artifacts, model as model_lib
from llama_lora.config.load import load_config
from llama_lora.config.schema import Config
from llama_lora.eval import baseline_path, print_report, settings, test_split
from llama_lora.evaluate import evaluate_split
from llama_lora.generation import (
    Loaded, base_model_of, config_for, inference_runtime, is_override, load_base, read_prompt_format,
    resolve_target, split_run_dir_arg,
)

log = logging.getLogger("llama_lora.baseline")


def run(cfg: Config) -> dict:
    if cfg.infer.run_dir is not None:
        target = resolve_target(cfg.infer.run_dir, cfg.output_dir)
        loaded = _load_run_base(cfg, target)
        out = target / "baseline.json"
    else:
        loaded = load_base(cfg)
        out = baseline_path(cfg.output_dir, cfg.preset)
    ds = test_split(cfg)
    log.info("Evaluating the base model %s on %d examples", loaded.base_model, len(ds))
    metrics = evaluate_split(loaded.model, loaded.tokenizer, loaded.fmt, ds, cfg, loaded.device)
    result = {"settings": settings(cfg, loaded.base_model, loaded.fmt), "baseline": metrics}
    artifacts.write_json(out, result)
    print_report(result)
    log.info("Wrote %s", out)
    return result


def _load_run_base(cfg: Config, target: Path) -> Loaded:
    """The base a run was trained on, with the run's tokenizer and prompt format (no adapter)."""
    runtime = inference_runtime(cfg)
    base = base_model_of(target, cfg)
    tok_dir = target / "tokenizer"
    tokenizer = model_lib.load_tokenizer(str(tok_dir) if tok_dir.is_dir() else base, cfg.model)
    model = model_lib.load_model(base, cfg.model, runtime, training=False).eval()
    return Loaded(model, tokenizer, read_prompt_format(target, cfg, tokenizer), target, base, runtime.device)


def cli(args: list[str]) -> dict:
    rest, run_dir = split_run_dir_arg(args)
    overrides = [a for a in rest if is_override(a)]
    parser = argparse.ArgumentParser(prog="llama-lora baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="evaluate this run's base model with the run's settings")
    ns = parser.parse_args([a for a in rest if a not in overrides])
    cfg = load_config(overrides)
    run_dir = ns.run_dir or run_dir or cfg.infer.run_dir
    if run_dir is not None:
        cfg = config_for(resolve_target(run_dir, cfg.output_dir), overrides)
    return run(cfg)


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["baseline", *sys.argv[1:]])
