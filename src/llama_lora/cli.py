"""`llama-lora <command> [args] [hydra overrides]`: parse argv, build the config, call the command's run().

This is the only module that reads argv. Each command is a plain function `run(cfg, ...)` in its own
module; here each gets its flags parsed and its config built (config.load for a new configuration,
runs.command_config for a saved run). Expected mistakes (LlamaLoraError) print one paragraph and exit 2;
`--debug` or LLAMA_LORA_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
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
    "serve": ("llama_lora.serve", "serve runs over an OpenAI-compatible API, with a chat page"),
    "export": ("llama_lora.export", "write a run as a verified GGUF file (llama.cpp, Ollama) with a Modelfile"),
}

USAGE = """usage: llama-lora <command> [options] [key=value ...]

commands:
{commands}

Overrides are Hydra syntax: llama-lora train experiment=quickstart peft=dora peft.r=8
Add --debug (or LLAMA_LORA_DEBUG=1) to see tracebacks."""

# A Hydra override: an optional +/~ prefix, a dotted key (or group), '=' and a value. Anything else on
# the command line (a prompt that happens to contain '=' after other words) is not one.
_OVERRIDE = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.@/-]*=")


def is_override(arg: str) -> bool:
    """A Hydra override, unless it names an existing file or folder (`outputs/sweep/peft.r=2`, a run that
    `experiment -m` named after its override): a path on the command line is the run, not a setting."""
    return bool(_OVERRIDE.match(arg)) and not ("/" in arg and os.path.exists(arg))


def split_args(args: list[str], run_dir_shorthand: bool = True) -> tuple[list[str], list[str], str | None]:
    """(argparse arguments, Hydra overrides, the `run_dir=PATH` shorthand for infer.run_dir or None)."""
    run_dir = None
    if run_dir_shorthand:
        run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("run_dir=")), None)
        args = [a for a in args if not a.startswith("run_dir=")]
    overrides = [a for a in args if is_override(a)]
    return [a for a in args if a not in overrides], overrides, run_dir


def _command(name: str):
    """The command's module, imported when used (the commands import cli only to run as `python -m`)."""
    return importlib.import_module(COMMANDS[name][0])


def _parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    module_doc = _command(name).__doc__ or ""
    return argparse.ArgumentParser(prog=f"llama-lora {name}", description=doc or module_doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _run_dir_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("run_dir", nargs="?", help=f"{what} (default: infer.run_dir, else the latest finished run)")


# ----------------------------------------------------------------------------------------------------
# One function per command: parse its flags, build its config, call run().


def _plain(name: str, args: list[str]) -> object:
    """train and validate: flags none, overrides on conf/config.yaml."""
    from llama_lora.config.load import load_config

    rest, overrides, _ = split_args(args, run_dir_shorthand=False)
    _parser(name, COMMANDS[name][1]).parse_args(rest)
    return _command(name).run(load_config(overrides))


def _infer(args: list[str]) -> object:
    from llama_lora import runs

    rest, overrides, run_dir = split_args(args)
    parser = _parser("infer")
    parser.add_argument("prompt", nargs="?", help="the instruction; omit it for an interactive chat")
    parser.add_argument("--input", default="", help="optional input/context for the instruction")
    parser.add_argument("--input-file", help="JSONL of {instruction, input} or {prompt} records")
    parser.add_argument("--output-file", help="where to write JSONL answers (default: stdout)")
    parser.add_argument("--show-prompt", action="store_true", help="print each formatted prompt to stderr")
    ns = parser.parse_args(rest)
    if ns.prompt is not None and ns.input_file:
        parser.error("give a prompt or --input-file, not both")
    cfg = runs.command_config("infer", overrides, run_dir)
    return _command("infer").run(cfg, prompt=ns.prompt, input_file=ns.input_file, output_file=ns.output_file,
                                 show_prompt=ns.show_prompt, prompt_input=ns.input)


def _on_saved_run(name: str, args: list[str]) -> object:
    """eval and merge: `llama-lora <name> [RUN_DIR] [run_dir=...] [overrides]` on a saved run."""
    from llama_lora import runs

    rest, overrides, run_dir = split_args(args)
    parser = _parser(name)
    _run_dir_arg(parser, "run directory")
    ns = parser.parse_args(rest)
    return _command(name).run(runs.command_config(name, overrides, ns.run_dir or run_dir))


def _baseline(args: list[str]) -> object:
    from llama_lora import runs
    from llama_lora.config.load import load_config

    rest, overrides, run_dir = split_args(args)
    parser = _parser("baseline")
    _run_dir_arg(parser, "evaluate this run's base model with the run's settings")
    ns = parser.parse_args(rest)
    cfg = load_config(overrides)
    target = ns.run_dir or run_dir or cfg.infer.run_dir
    if target is not None:
        cfg = runs.saved_config(runs.resolve(target, cfg.output_dir), overrides, "baseline")
    return _command("baseline").run(cfg)


def _experiment(args: list[str]) -> object:
    experiment = _command("experiment")
    rest, overrides, _ = split_args(args, run_dir_shorthand=False)
    parser = _parser("experiment")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="expand sweep overrides (peft=lora,dora peft.r=4,8) into runs, or into the search "
                             "space when experiment.search.n_trials > 0")
    ns = parser.parse_args(rest)
    summary = experiment.run(experiment.build_config(overrides, ns.multirun))
    failed = [r for r in summary["runs"] if r["status"] == "failed"]
    if failed:
        others = "the others completed" if len(failed) < len(summary["runs"]) else "none completed"
        raise LlamaLoraError(
            f"{len(failed)} of {len(summary['runs'])} runs failed ({', '.join(r['run'] for r in failed)}); {others}. "
            f"Each error is in {summary['dir']}/summary.md. Fix the cause and run the same command again: "
            "finished runs are skipped, failed ones are retried."
        )
    return summary


# ---- serve
def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535, or 0 for any free port")
    return port


def _serve(args: list[str]) -> object:
    from llama_lora import serve
    from llama_lora.config.schema import ServeConfig
    from llama_lora.serve.pool import served_names

    # NAME=PATH names a run; other key=value arguments are overrides (infer.max_new_tokens=64).
    overrides = [a for a in args if is_override(a) and serve.named_run(a) is None]
    parser = _parser("serve")
    parser.add_argument("runs", nargs="*", metavar="[NAME=]RUN",
                        help="run directories on one base (default: the latest finished run), or one merged model; "
                             "NAME=RUN serves it as NAME (default: its folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free port; the log "
                                                                 "says which)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help=f"required as 'Authorization: Bearer KEY' (default: ${serve.KEY_ENV})")
    keys.add_argument("--api-key-file", help="read the API key from this file (keeps it out of `ps`)")
    parser.add_argument("--allowed-hosts", default="", metavar="NAME[,NAME...]",
                        help="more Host names to answer to besides localhost, loopback and --host (a proxy or LAN "
                             "name; '*': any). Other names are refused (DNS rebinding)")
    parser.add_argument("--print-vllm", action="store_true",
                        help="check that vLLM can take the runs' adapters and print the `vllm serve` command")
    for name, field in ServeConfig.model_fields.items():  # the limits: one flag per ServeConfig field
        parser.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"{field.description} (default: {field.default})")
    ns = parser.parse_args([a for a in args if a not in overrides])
    try:
        serve_cfg = ServeConfig(**{n: getattr(ns, n) for n in ServeConfig.model_fields})
    except ValueError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise LlamaLoraError(f"{flag} {err['input']} is invalid: {err['msg']}.") from None
    key = serve.api_key(ns.api_key, ns.api_key_file)  # before any run is read: a bad key fails at once
    specs = [serve.named_run(r) or (None, r) for r in ns.runs] or [(None, None)]
    cfgs = [serve.run_config(path, overrides) for _, path in specs]
    names = served_names(cfgs, [n for n, _ in specs])  # two runs under one name: refused here, as in serve
    if ns.print_vllm:
        from llama_lora.serve import vllm

        print(vllm.command(cfgs, names))
        for note in vllm.notes(cfgs, names):
            print(f"note: {note}", file=sys.stderr)
        return None
    return _command("serve").run(cfgs, serve_cfg, host=ns.host, port=ns.port, api_key=key, overrides=overrides,
                                 names=names, allowed_hosts=[h for h in ns.allowed_hosts.split(",") if h.strip()])


# ---- export
def _export(args: list[str]) -> object:
    from llama_lora import runs

    rest, overrides, run_dir = split_args(args)
    parser = _parser("export")
    _run_dir_arg(parser, "run directory or merged model directory")
    parser.add_argument("--format", default="gguf", help="output format: gguf (default)")
    parser.add_argument("--dtype", default="f16", help="f16 (default), bf16, q8_0 or f32")
    parser.add_argument("--output", help="folder to create for model.gguf, Modelfile, export.json "
                                         "(default: <run>/gguf-<dtype>)")
    parser.add_argument("--adapter", action="store_true",
                        help="also write the LoRA alone as adapter.gguf (llama.cpp --lora, Ollama ADAPTER)")
    parser.add_argument("--no-llama-cpp-check", dest="llama_cpp_check", action="store_false",
                        help="do not run the file in llama.cpp (export.json records it as not verified there)")
    ns = parser.parse_args(rest)
    cfg = runs.command_config("export", overrides, ns.run_dir or run_dir)
    return _command("export").run(cfg, fmt=ns.format, dtype=ns.dtype, output=ns.output, adapter=ns.adapter,
                                  llama_cpp_check=ns.llama_cpp_check)


_PARSERS = {
    "train": lambda a: _plain("train", a),
    "validate": lambda a: _plain("validate", a),
    "infer": _infer,
    "eval": lambda a: _on_saved_run("eval", a),
    "merge": lambda a: _on_saved_run("merge", a),
    "baseline": _baseline,
    "experiment": _experiment,
    "serve": _serve,
    "export": _export,
}


# ----------------------------------------------------------------------------------------------------


def _usage() -> str:
    return USAGE.format(commands="\n".join(f"  {k:<11}{v[1]}" for k, v in COMMANDS.items()))


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
    quiet_third_party(sys.stderr.isatty())


# Third-party messages a user of llama-lora cannot act on, each matched exactly (logger, message start), so
# that everything else, our own warnings first, still shows:
_THIRD_PARTY_NOISE = {
    # Llama 3's tokenizer_config.json sets clean_up_tokenization_spaces=true; transformers ignores it for BPE.
    "transformers.tokenization_utils_tokenizers": ("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",),
}
# PEFT 0.21 calls transformers 5's deprecated aliases; nothing the user runs or configures reaches them.
_THIRD_PARTY_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
    r"`gradient_checkpointing_enable` is deprecated and will be removed in v6",
    r"`gradient_checkpointing_disable` is deprecated and will be removed in v6",
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party(terminal: bool) -> None:
    """Silence the third-party messages above (narrowly), and transformers' weight-loading bars off a terminal."""
    import warnings

    for name, starts in _THIRD_PARTY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    for message in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if not terminal:  # a bar redrawn with \r is noise in a log file; a terminal keeps it
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


# Import name of each optional dependency -> the pyproject extra that installs it.
OPTIONAL_EXTRAS = {"bitsandbytes": "quant", "llama_cpp": "llamacpp", "wandb": "wandb", "flash_attn": "flash",
                   "deepspeed": "deepspeed", "trl": "bench"}


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
        from llama_lora.artifacts import check_cache_env

        check_cache_env()  # HF_HOME & co. pointing at a file: say so, not what happened to be read first
        _PARSERS[name](args)
    except LlamaLoraError as e:
        if debug:
            logging.getLogger("llama_lora").exception("details")
        # Under torchrun / accelerate launch every process reaches the same verdict (train shares its
        # decisions); one copy of the paragraph is enough.
        if os.environ.get("RANK", "0") == "0" or debug:
            print("\n" + textwrap.fill(f"error: {e}", width=100, break_long_words=False, break_on_hyphens=False),
                  file=sys.stderr)
        raise SystemExit(2)
    except ModuleNotFoundError as e:
        extra = OPTIONAL_EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"\nerror: `llama-lora {name}` needs the optional package '{e.name}', which is not installed: "
              f"pip install 'llama-lora[{extra}]'", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
