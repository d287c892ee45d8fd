"""Find what a command runs on and load it: the one place that reads a trained run back.

A target is a run directory (adapter/, config.yaml, run.json, prompt.json, tokenizer/), a merged model
directory (`<run>/merged`, a plain transformers model), or, when none is named, the latest finished run
under output_dir. infer, eval, baseline and merge (and anything serving or exporting a run) resolve
it with `resolve`, build its config with `saved_config` (the config the run was trained with, plus the
overrides that make sense for that command) and load it with `load`, so prompts are formatted exactly
as in training.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_lora import artifacts, model as model_lib
from llama_lora.artifacts import RunDir
from llama_lora.config.load import GROUPS, load_config, load_config_file, parse_overrides
from llama_lora.config.schema import USE_MAY_CHANGE, Config
from llama_lora.data import PromptFormat
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)

# What a command may change on a saved run: how it runs and what it reports, never what was trained
# (the adapter, its base, its data formatting). Anything else would be silently ignored, so it is refused.
SAVED_RUN_FIELDS: dict[str, tuple[str, ...]] = {
    "infer": (*USE_MAY_CHANGE, "infer."),
    "eval": (*USE_MAY_CHANGE, "eval.", "data."),
    "baseline": (*USE_MAY_CHANGE, "eval.", "data."),
    # merge: model.quantization names the output's (refused unless none or the run's own: merge.py)
    "merge": ("training.device", "model.dtype", "model.trust_remote_code", "model.quantization", "output_dir",
              "infer.run_dir"),
    "export": ("training.device", "model.dtype", "model.trust_remote_code", "output_dir", "infer.run_dir"),
}
SAVED_RUN_FIELDS["serve"] = SAVED_RUN_FIELDS["infer"]  # serve answers as infer does


def is_run_dir(path: Path) -> bool:
    return (path / "adapter" / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    """A standalone transformers model (e.g. `<run>/merged`): weights and config, no adapter."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def resolve(run_dir: str | None, output_dir: str) -> Path:
    """`run_dir`, or the latest finished run under output_dir; must be a run or a model directory."""
    if run_dir is None:
        return artifacts.latest_finished_run(output_dir).path
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise LlamaLoraError(f"Run directory '{run_dir}' does not exist. Pass an existing run directory "
                             f"(e.g. {output_dir}/<run_name>) or leave infer.run_dir unset for the latest run.")
    if (path / "adapter_config.json").is_file() and is_run_dir(path.parent):
        return path.parent  # the adapter/ folder itself was given
    if is_run_dir(path) or is_model_dir(path):
        return path
    if RunDir(path).is_owned():
        raise LlamaLoraError(unfinished_message(RunDir(path)))
    raise LlamaLoraError(
        f"'{run_dir}' is neither a llama-lora run directory (with adapter/adapter_config.json) nor a merged "
        f"model directory (with config.json)."
    )


def unfinished_message(run: RunDir) -> str:
    """Why a run that llama-lora started cannot be used yet, and the command that finishes it."""
    status = run.status()
    state, pid = status.get("status", "unknown"), status.get("pid")
    alive = isinstance(pid, int) and artifacts.process_alive(pid)
    if state == "running" and alive:
        return (f"Run {run.path} is still training (process {pid}): its adapter is not final. Wait for it to "
                "finish, then run this command again.")
    if state == "finished":  # finished, but adapter/adapter_config.json is gone
        return (f"Run {run.path} finished training, but its adapter/adapter_config.json is missing: the run is "
                "damaged. Restore it from a copy, or train it again.")
    why = {"running": f"status 'running', but its process {pid} is gone (killed or crashed)" if pid else
           "status 'running', but no process is training it",
           "interrupted": "interrupted" + (f" at step {status['step']}" if status.get("step") else ""),
           "failed": f"failed: {status.get('error', 'see its train.log')}"}.get(state, f"status '{state}'")
    return (f"Run {run.path} is a llama-lora run whose training did not finish ({why}), so it has no final "
            f"adapter yet. Resume it with the command that started it (`llama-lora train ... "
            f"output_dir={run.path.parent} run_name={run.path.name}`): it continues from its newest checkpoint.")


def command_config(command: str, overrides: list[str], run_dir: str | None = None) -> Config:
    """The config `command` runs with on a saved target: find it (run_dir, else infer.run_dir from the
    overrides, else the latest finished run), then its saved config plus the overrides."""
    first = load_config(overrides)  # fails early, with the usual messages, on a bad key or value
    return saved_config(resolve(run_dir or first.infer.run_dir, first.output_dir), overrides, command)


def saved_config(target: Path, overrides: list[str], command: str) -> Config:
    """The config a run was trained with (its config.yaml, or its parent's for a merged model inside
    a run), with the user's overrides on top; overrides that cannot apply to a saved run are refused."""
    cfg_file = next((p / "config.yaml" for p in (target, target.parent) if (p / "config.yaml").is_file()), None)
    if cfg_file is None:  # a model directory from elsewhere: the defaults describe how to run it
        cfg = load_config(overrides)
    else:
        _check_applicable(command, overrides, target)
        cfg = load_config(overrides, base=load_config_file(cfg_file))
    cfg.infer.run_dir = str(target)
    return cfg


def _check_applicable(command: str, overrides: list[str], target: Path) -> None:
    allowed = SAVED_RUN_FIELDS[command]
    groups, fixed = [], []
    for o in parse_overrides(overrides):
        key = o.key_or_group
        if key in GROUPS and o.package is None:
            groups.append(o.input_line)
        elif not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            fixed.append(o.input_line)
    if groups:
        raise LlamaLoraError(
            f"{groups} select config groups, which cannot change for an existing run: its config.yaml already "
            "holds the composed result. Leave them out (name the run with run_dir=...) and override single "
            "fields if needed, e.g. infer.max_new_tokens=64."
        )
    if fixed:
        accepted = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
        raise LlamaLoraError(
            f"{fixed} cannot apply to the saved run {target}: `{command}` uses the run as it was trained (its "
            f"config.yaml), so these would be ignored. `{command}` accepts {accepted}. "
            "To train with other settings, run `llama-lora train` with them."
        )


@contextlib.contextmanager
def writing_into(cfg: Config, purpose: str, shared: bool = False):
    """Yield cfg with its target resolved once (so "the latest finished run" cannot change meanwhile) and,
    for a run directory, that run locked for `purpose` (one writer per run: artifacts.RunDir.lock).
    shared=True for a command that only reads the run (export): a shared lock, none on a read-only mount."""
    target = resolve(cfg.infer.run_dir, cfg.output_dir)
    pinned = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"run_dir": str(target)})})
    if not is_run_dir(target):  # a merged model: nothing of a run is written
        yield pinned
        return
    run = RunDir(target)
    with (run.read_lock(purpose) if shared else run.lock(purpose)):
        yield pinned


# ----------------------------------------------------------------------------------------------------
# Loading.


@dataclass
class Loaded:
    model: PreTrainedModel  # a PeftModel for a run (unless loaded without its adapter), else a plain model
    tokenizer: PreTrainedTokenizerBase
    fmt: PromptFormat
    target: Path
    base_model: str  # resolved base path/id ("" for a merged model)
    device: str

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")


def inference_runtime(cfg: Config, dtype: torch.dtype | None = None) -> model_lib.Runtime:
    runtime = model_lib.choose_runtime(cfg.training, cfg.model, model_lib.probe_capabilities())
    model_lib.apply_process_settings(runtime)
    return runtime if dtype is None else replace(runtime, model_dtype=dtype)


def base_model_of(target: Path, cfg: Config) -> str:
    """The base a run was trained on: run.json records the resolved path (or hub id)."""
    base = RunDir(target).status().get("base_model")
    if base and (Path(base).exists() or not base.startswith(("/", ".", "~"))):
        return base
    return model_lib.resolve_model_path(cfg.model.name_or_path)


def read_prompt_format(target: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    for p in (target / "prompt.json", target.parent / "prompt.json"):
        if p.is_file():
            data = artifacts.read_json(p)
            try:
                return PromptFormat(**data)
            except TypeError as e:  # not a dict, or keys another version of llama-lora did not write
                raise LlamaLoraError(
                    f"The run's prompt format {p} is damaged ({e}): it says how prompts were formatted in "
                    "training. Restore it from a copy of the run, or train the run again.") from e
    log.warning("No prompt.json next to %s; choosing the prompt format from the config.", target)
    return PromptFormat.choose(cfg.data, tokenizer)


def load_adapter(base: PreTrainedModel, adapter_dir: Path):
    """PeftModel.from_pretrained with errors a user can act on (missing or corrupted files)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0]
        raise LlamaLoraError(
            f"Could not load the adapter in {adapter_dir} ({text}). Its adapter_model.safetensors or "
            "adapter_config.json is missing, truncated or corrupted, or it was trained on a different base "
            "model. Re-run training to produce it again."
        ) from e


def load(cfg: Config, adapter: bool = True, runtime: model_lib.Runtime | None = None) -> Loaded:
    """Load cfg.infer.run_dir (or the latest finished run) for inference, in eval mode.

    A run directory: its base model (from run.json), its tokenizer and prompt format, and its adapter
    unless `adapter=False` (the base as the run saw it: baseline). A merged model directory: itself.
    """
    target = resolve(cfg.infer.run_dir, cfg.output_dir)
    runtime = runtime or inference_runtime(cfg)
    if is_run_dir(target):
        run = RunDir(target)
        base = base_model_of(target, cfg)
        tokenizer = model_lib.load_tokenizer(str(run.tokenizer) if run.tokenizer.is_dir() else base, cfg.model)
        model = model_lib.load_model(base, cfg.model, runtime, training=False)
        if adapter:
            model = load_adapter(model, run.adapter)
    else:
        base = ""
        tokenizer = model_lib.load_tokenizer(str(target), cfg.model)
        # A merged model is a plain full-precision model: it is never re-quantized on load, whatever its
        # run trained on (its merge.json says how it differs from the quantized base + adapter).
        runtime = replace(runtime, quantization="none")
        model = model_lib.load_model(str(target), cfg.model.model_copy(update={"revision": None}), runtime,
                                     training=False)
    model.eval()
    fmt = read_prompt_format(target, cfg, tokenizer)
    what = "merged model" if not base else "base + adapter" if adapter else "base model (adapter not loaded)"
    if runtime.quantization != "none" and base:
        what += f", base {runtime.quantization}-quantized by bitsandbytes as in training"
    log.info("Loaded %s (%s) on %s, prompt format %s", target, what, runtime.device, fmt.kind)
    return Loaded(model, tokenizer, fmt, target, base, runtime.device)


def load_base(cfg: Config, runtime: model_lib.Runtime | None = None) -> Loaded:
    """The configured base model (no run) with the prompt format training would choose: for baseline."""
    runtime = runtime or inference_runtime(cfg)
    base = model_lib.resolve_model_path(cfg.model.name_or_path)
    tokenizer = model_lib.load_tokenizer(base, cfg.model)
    model = model_lib.load_model(base, cfg.model, runtime, training=False).eval()
    return Loaded(model, tokenizer, PromptFormat.choose(cfg.data, tokenizer), Path(base), base, runtime.device)
