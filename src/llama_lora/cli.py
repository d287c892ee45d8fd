"""`llama-lora <command> [args] [hydra overrides]`: parse, call the command's run(), report errors.

Expected mistakes (LlamaLoraError) print one paragraph and exit 2; `--debug` or LLAMA_LORA_DEBUG=1
shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from llama_lora.errors import LlamaLoraError

# command -> (module with run(cfg), one-line help). The module is imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("llama_lora.train", "fine-tune a LoRA/DoRA adapter"),
    "infer": ("llama_lora.infer", "answer a prompt, a JSONL file, or chat with a run or merged model"),
    "baseline": ("llama_lora.baseline", "evaluate the base model (no adapter) on the held-out split"),
    "eval": ("llama_lora.eval", "evaluate a run against its base model: loss, perplexity, exact match"),
    "merge": ("llama_lora.merge", "merge a run's adapter into the base weights and verify the result"),
    "validate": ("llama_lora.validate", "check a configuration, the model, the data and memory before training"),
    "experiment": ("llama_lora.experiment", "run several configurations (preset, -m sweep or Optuna search), compare, plot"),
}

USAGE = """usage: llama-lora <command> [options] [key=value ...]

commands:
{commands}

Overrides are Hydra syntax: llama-lora train experiment=quickstart peft=dora peft.r=8
Add --debug (or LLAMA_LORA_DEBUG=1) to see tracebacks."""


def _usage() -> str:
    return USAGE.format(commands="\n".join(f"  {k:<11}{v[1]}" for k, v in COMMANDS.items()))


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides contain '=' and do not start with '-'; everything else is for argparse."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    rest = [a for a in args if a not in overrides]
    return rest, overrides


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # per-split "Generating ..." bars from datasets say nothing useful here
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _run_command(name: str, args: list[str]) -> object:
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "cli"):  # commands with their own flags (e.g. infer's prompt) parse them there
        return module.cli(args)
    rest, overrides = split_overrides(args)
    parser = argparse.ArgumentParser(prog=f"llama-lora {name}", description=COMMANDS[name][1])
    parser.parse_args(rest)
    from llama_lora.config.load import load_config

    return module.run(load_config(overrides))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLAMA_LORA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'.\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    setup_logging(debug)
    try:
        _run_command(name, args)
    except LlamaLoraError as e:
        if debug:
            logging.getLogger("llama_lora").exception("details")
        # Under torchrun / accelerate launch every process reaches the same verdict (train shares its
        # decisions); one copy of the paragraph is enough.
        if os.environ.get("RANK", "0") == "0" or debug:
            print("\n" + textwrap.fill(f"error: {e}", width=100, break_long_words=False, break_on_hyphens=False),
                  file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
