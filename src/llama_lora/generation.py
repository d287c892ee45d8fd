"""Load a trained run (base + adapter) or a merged model for generation, and generate from it.

Shared by infer, eval, baseline and merge. Everything comes from the run directory (config.yaml,
run.json, prompt.json, tokenizer/, adapter/), so inference formats prompts exactly as training did.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from llama_lora import artifacts, model as model_lib
from llama_lora.artifacts import RunDir
from llama_lora.config.load import load_config, load_config_file, validate
from llama_lora.config.schema import Config
from llama_lora.data import PromptFormat
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)

# A Hydra-style override: a dotted key, '=' and a value. Anything else on the command line (a prompt
# that happens to contain '=') is not one.
_OVERRIDE = re.compile(r"^[+~]?[A-Za-z_][\w.]*=")
# Groups select a whole YAML file at compose time; an existing run's config is already composed.
_GROUPS = {"model", "data", "peft", "training", "experiment"}
# Llama 3 ends a turn with <|eot_id|> and a document with <|end_of_text|>; generation must stop at both.
_EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


def is_override(arg: str) -> bool:
    return bool(_OVERRIDE.match(arg))


# ----------------------------------------------------------------------------------------------------
# Finding what to load and the config it was made with.


def is_run_dir(path: Path) -> bool:
    return (path / "adapter" / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    """A standalone transformers model (e.g. `<run>/merged`): weights and config, no adapter."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def resolve_target(run_dir: str | None, output_dir: str) -> Path:
    """infer.run_dir, or the latest finished run under output_dir; must be a run or a model directory."""
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
    hint = ""
    if (path / "run.json").is_file() and not RunDir(path).is_finished():
        hint = f" Its status is '{RunDir(path).status().get('status', 'unknown')}': training did not finish."
    raise LlamaLoraError(
        f"'{run_dir}' is neither a llama-lora run directory (with adapter/adapter_config.json) nor a merged "
        f"model directory (with config.json).{hint}"
    )


def _apply_overrides(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in _GROUPS]
    if groups:
        raise LlamaLoraError(
            f"{groups} select config groups, which cannot change for an existing run: its config.yaml already "
            "holds the composed result. Leave them out (name the run with run_dir=...) and override single "
            "fields if needed, e.g. infer.max_new_tokens=64."
        )
    dotlist = [o.lstrip("+") for o in overrides if not o.startswith("~")]
    try:
        merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(dotlist))
    except Exception as e:
        raise LlamaLoraError(f"Could not apply the overrides {overrides}: {e}") from e
    return OmegaConf.to_container(merged, resolve=True)


def config_for(target: Path, overrides: list[str]) -> Config:
    """The config a run was trained with (its config.yaml), plus the user's overrides on top.

    For a merged model the config of the run it came from is used when it sits inside one.
    """
    cfg_file = next((p / "config.yaml" for p in (target, target.parent) if (p / "config.yaml").is_file()), None)
    if cfg_file is None:
        cfg = load_config(overrides)
    else:
        cfg = validate(_apply_overrides(load_config_file(cfg_file).model_dump(mode="json"), overrides))
    cfg.infer.run_dir = str(target)
    return cfg


def cli_config(overrides: list[str], run_dir: str | None = None) -> Config:
    """CLI helper: validate the overrides, find the run (positional, infer.run_dir or latest), load its config."""
    first = load_config(overrides)  # fails early, with the usual messages, on a bad key or value
    target = resolve_target(run_dir or first.infer.run_dir, first.output_dir)
    return config_for(target, overrides)


def run_dir_cli(prog: str, description: str | None, args: list[str]) -> Config:
    """Parse `llama-lora <prog> [RUN_DIR] [run_dir=...] [overrides]` into the run's config (eval, merge)."""
    import argparse

    rest, run_dir = split_run_dir_arg(args)
    overrides = [a for a in rest if is_override(a)]
    parser = argparse.ArgumentParser(prog=f"llama-lora {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="run directory (default: infer.run_dir, else the latest finished run)")
    ns = parser.parse_args([a for a in rest if a not in overrides])
    return cli_config(overrides, ns.run_dir or run_dir)


def split_run_dir_arg(args: list[str]) -> tuple[list[str], str | None]:
    """Accept `run_dir=PATH` as a shorthand for infer.run_dir=PATH."""
    run_dir = None
    rest = []
    for a in args:
        if a.startswith("run_dir="):
            run_dir = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, run_dir


# ----------------------------------------------------------------------------------------------------
# Loading.


@dataclass
class Loaded:
    model: PreTrainedModel  # a PeftModel for a run, a plain model for a merged directory
    tokenizer: PreTrainedTokenizerBase
    fmt: PromptFormat
    target: Path
    base_model: str  # resolved base path/id ("" for a merged model)
    device: str

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")


def inference_runtime(cfg: Config) -> model_lib.Runtime:
    runtime = model_lib.choose_runtime(cfg.training, cfg.model, model_lib.probe_capabilities())
    model_lib.apply_process_settings(runtime)
    return runtime


def base_model_of(target: Path, cfg: Config) -> str:
    """The base a run was trained on: run.json records the resolved path (or hub id)."""
    base = RunDir(target).status().get("base_model")
    if base and (Path(base).exists() or not base.startswith(("/", ".", "~"))):
        return base
    return model_lib.resolve_model_path(cfg.model.name_or_path)


def read_prompt_format(target: Path, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    for p in (target / "prompt.json", target.parent / "prompt.json"):
        if p.is_file():
            return PromptFormat(**artifacts.read_json(p))
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


def load_for_inference(cfg: Config, runtime: model_lib.Runtime | None = None) -> Loaded:
    target = resolve_target(cfg.infer.run_dir, cfg.output_dir)
    runtime = runtime or inference_runtime(cfg)
    if is_run_dir(target):
        run = RunDir(target)
        base = base_model_of(target, cfg)
        tok_path = str(run.tokenizer) if run.tokenizer.is_dir() else base
        tokenizer = model_lib.load_tokenizer(tok_path, cfg.model)
        model = load_adapter(model_lib.load_model(base, cfg.model, runtime, training=False), run.adapter)
    else:
        base = ""
        tokenizer = model_lib.load_tokenizer(str(target), cfg.model)
        model = model_lib.load_model(str(target), cfg.model.model_copy(update={"revision": None}), runtime,
                                     training=False)
    model.eval()
    fmt = read_prompt_format(target, cfg, tokenizer)
    log.info("Loaded %s (%s) on %s, prompt format %s", target, "base + adapter" if base else "merged model",
             runtime.device, fmt.kind)
    return Loaded(model, tokenizer, fmt, target, base, runtime.device)


def load_base(cfg: Config, runtime: model_lib.Runtime | None = None) -> Loaded:
    """The base model of cfg (no adapter) with the prompt format training would choose: for baseline."""
    runtime = runtime or inference_runtime(cfg)
    base = model_lib.resolve_model_path(cfg.model.name_or_path)
    tokenizer = model_lib.load_tokenizer(base, cfg.model)
    model = model_lib.load_model(base, cfg.model, runtime, training=False).eval()
    return Loaded(model, tokenizer, PromptFormat.choose(cfg.data, tokenizer), Path(base), base, runtime.device)


def with_dtype(runtime: model_lib.Runtime, dtype: torch.dtype) -> model_lib.Runtime:
    return replace(runtime, model_dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Generation.


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a reply: generation_config's eos ids, the tokenizer's eos, and Llama 3's
    <|eot_id|> / <|end_of_text|> when the vocabulary has them."""
    ids: list[int | None] = []
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _EXTRA_STOP_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_config(model, tokenizer, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0) -> GenerationConfig:
    kwargs: dict[str, Any] = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id, **kwargs,
    )


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, streamer=None) -> list[str]:
    """Answers to already-formatted prompts, batched with left padding (so every row ends at its prompt)."""
    tokenizer.padding_side = "left"
    # The prompts carry their own special tokens (bos from the template), exactly as in training.
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**enc, generation_config=gen, streamer=streamer)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_batched(model, tokenizer, prompts: list[str], gen: GenerationConfig, batch_size: int) -> list[str]:
    # Similar lengths share a batch (less padding); answers come back in the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for j, a in zip(idx, generate(model, tokenizer, [prompts[k] for k in idx], gen)):
            answers[j] = a
    return answers
