"""The models `llama-lora serve` answers with: one base in memory, each run's adapter on it (PEFT multi-adapter).

Each served name is an `Entry`: a run (its adapter, tokenizer and saved prompt format, loaded with the same
`runs` functions infer uses) or the plain base (the adapter switched off, with the first run's tokenizer and
prompt format: the base as its runs saw it, like `baseline`). A run is served under its folder's name, or
the name given as `NAME=PATH`. Only the engine's worker thread calls the methods that touch the model
(`add`, `remove`, `activate`), so switching adapters never races a generation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_lora import runs
from llama_lora import model as model_lib
from llama_lora.artifacts import RunDir
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.runs import Loaded

log = logging.getLogger("llama_lora.serve")

# What `serve` may change on a saved run is what `infer` may (the request defaults infer.*, and the
# runtime): registered under serve's own name, so that a refused override names the command the user ran.

# A probe prompt for the "is the adapter applied?" check at load time (merge checks the same way).
PROBE = ("Reverse the word.", "probe")


class RunBusy(LlamaLoraError):
    """The run is locked by another llama-lora process (training, merging)."""


@dataclass
class Entry:
    name: str  # the OpenAI `model` id
    loaded: Loaded  # model (shared), tokenizer, prompt format, target, base
    cfg: Config  # the run's saved config (its infer.* settings are the request defaults)
    adapter: str | None  # PEFT adapter name inside the shared model; None = the plain base
    created: int

    def __post_init__(self):
        # The HTTP thread counts prompt tokens with its own copy: a fast tokenizer used from two threads
        # while generate() sets its padding fails with "Already borrowed".
        self.counter = copy.deepcopy(self.loaded.tokenizer)

    @property
    def kind(self) -> str:
        return "base" if self.adapter is None else "adapter"


def _base_id(base: str) -> str:
    """The served name of the base: a hub id as is, a local folder by its name."""
    path = Path(base)
    return path.name if path.exists() else base


@dataclass(frozen=True)
class BaseKey:
    """What must agree for runs to share one base copy in memory."""

    path: str
    revision: str | None
    dtype: str
    quantization: str

    @classmethod
    def of(cls, cfg: Config, base: str) -> "BaseKey":
        m = cfg.model
        return cls(str(Path(base).resolve()) if Path(base).exists() else base, m.revision, m.dtype,
                   getattr(m, "quantization", None) or "none")

    def describe(self, other: "BaseKey", held: bool = False) -> str:
        """This base in words, naming what differs from `other`; held=True: "it ..." when the path is the same."""
        quant = "unquantized" if self.quantization == "none" else f"{self.quantization}-quantized"
        if held and self.path == other.path:
            text = "it" + (f" {quant}" if self.quantization != other.quantization else "")
        else:
            text = f"the {quant + ' ' if self.quantization != other.quantization else ''}base {self.path}"
        if self.revision != other.revision:
            text += f" at revision {self.revision or 'main'}"
        if self.dtype != other.dtype:
            text += f" in dtype {self.dtype}"
        return text

    def advice(self, other: "BaseKey") -> str:
        """How to serve runs on `other` when this server holds this key."""
        if (self.path, self.revision, self.quantization) == (other.path, other.revision, other.quantization):
            return f"Serve them with one dtype (add model.dtype={self.dtype} to the command), or start one "\
                   "`llama-lora serve` per dtype (each on its own --port)."
        if (self.path, self.revision) == (other.path, other.revision):
            return "One server holds the base once, quantized one way: start one `llama-lora serve` for the runs " \
                   "trained on the quantized base and one for the others (each on its own --port)."
        return "One server holds one base in memory and serves the adapters trained on it: start one " \
               "`llama-lora serve` per base (each on its own --port), or merge a run (`llama-lora merge`) and " \
               "serve the merged model alone."


def served_names(cfgs: list[Config], names: list[str | None] | None = None) -> list[str]:
    """The name each run is served under: the given one (`NAME=PATH`), else its folder's name (a merged
    model inside a run: `<run>-merged`). Two runs under one name are refused, saying how to name them."""
    names = list(names or [None] * len(cfgs))
    out = []
    for cfg, name in zip(cfgs, names):
        target = runs.resolve(cfg.infer.run_dir, cfg.output_dir)
        if name is None and not runs.is_run_dir(target) and target.name == "merged" \
                and (target.parent / "run.json").is_file():
            name = f"{target.parent.name}-merged"  # `llama-lora merge` output
        out.append(name or target.name)
    for name in dict.fromkeys(out):
        paths = [cfg.infer.run_dir for cfg, n in zip(cfgs, out) if n == name]
        if len(paths) > 1:
            same = len(set(paths)) == 1
            what = f"{paths[0]} is named {len(paths)} times" if same else \
                f"{len(paths)} runs would be served as '{name}' ({', '.join(paths)})"
            example = " ".join(f"{name}-{i + 1}={p}" for i, p in enumerate(paths))
            raise LlamaLoraError(
                f"{what}: each served model needs its own name. {'Name it once, or name each' if same else 'Name each'}"
                f" with NAME=PATH (`llama-lora serve {example}`); a running server also takes more runs by "
                "POST /v1/adapters with a \"name\"."
            )
    return out


class Pool:
    """Loads runs that share one base; names -> entries. Not thread-safe: the engine's worker owns it."""

    def __init__(self, cfgs: list[Config], names: list[str | None] | None = None):
        """Load the runs `cfgs` (on one base), served under `names` (None: each folder's name)."""
        if not cfgs:
            raise LlamaLoraError("Nothing to serve: name at least one run directory.")
        self.entries: dict[str, Entry] = {}
        self._next_adapter = 0
        names = served_names(cfgs, names)
        first = cfgs[0]
        target = runs.resolve(first.infer.run_dir, first.output_dir)
        self.runtime = runs.inference_runtime(first)
        if not runs.is_run_dir(target):  # a merged (standalone) model: served alone, as itself
            if len(cfgs) > 1:
                raise LlamaLoraError(
                    f"{target} is a standalone (merged) model; it cannot share a base with other runs. Serve it "
                    "alone, or serve the runs' directories (with adapter/) together."
                )
            loaded = runs.load(first, runtime=self.runtime)
            self.model, self.base, self.key = loaded.model, "", None
            self.entries[names[0]] = Entry(names[0], loaded, first, None, int(time.time()))
            self.context_length = _context_length(self.model)
            return
        for c in cfgs:  # before the base is loaded: a run still training is refused at once
            check_finished(runs.resolve(c.infer.run_dir, c.output_dir))
        bases = [(runs.base_model_of(runs.resolve(c.infer.run_dir, c.output_dir), c), c) for c in cfgs]
        keys = [BaseKey.of(c, b) for b, c in bases]
        if len(set(keys)) > 1:
            other = next(k for k in keys if k != keys[0])
            listing = "; ".join(f"{n} on {k.describe(other if k == keys[0] else keys[0])}"
                                for n, k in zip(names, keys))
            raise LlamaLoraError(f"These runs cannot share one base model in memory: {listing}. "
                                 f"{keys[0].advice(other)}")
        self.base, self.key = bases[0][0], keys[0]
        base_name = _base_id(self.base)
        if base_name in names:
            raise LlamaLoraError(
                f"The base model is served as '{base_name}', which is also the name of the run "
                f"{cfgs[names.index(base_name)].infer.run_dir}. Give the run another name with NAME=PATH "
                f"(`llama-lora serve {base_name}-lora={cfgs[names.index(base_name)].infer.run_dir}`)."
            )
        log.info("Loading the base model %s once for %d run(s)", self.base, len(cfgs))
        self.model = model_lib.load_model(self.base, first.model, self.runtime, training=False).eval()
        self.context_length = _context_length(self.model)
        for cfg, name in zip(cfgs, names):
            self.add(cfg, name)
        base_loaded = next(iter(self.entries.values())).loaded
        self.entries[base_name] = Entry(base_name, base_loaded, first, None, int(time.time()))

    # ------------------------------------------------------------------------------------------------

    def add(self, cfg: Config, name: str | None = None) -> Entry:
        """Load a finished run's adapter onto the shared base, probe it, and serve it under `name` (default:
        its folder's name). Anything wrong with the run is a LlamaLoraError (RunBusy: another llama-lora
        process writes it), with the model unchanged."""
        target = runs.resolve(cfg.infer.run_dir, cfg.output_dir)
        name = name or target.name
        if not runs.is_run_dir(target):
            raise LlamaLoraError(f"{target} is a standalone model, not a run with an adapter: it cannot be "
                                 "added to a running server. Serve it with its own `llama-lora serve`.")
        if name in self.entries:
            raise LlamaLoraError(f"A model named '{name}' is already served. Remove it first (DELETE "
                                 f"/v1/adapters/{name}), or give this run another name ({{\"name\": ...}}).")
        run = RunDir(target)
        check_finished(target)
        base = runs.base_model_of(target, cfg)
        key = BaseKey.of(cfg, base)
        if self.key is None or key != self.key:
            held = "a merged model" if self.key is None else self.key.describe(key, held=True)
            raise LlamaLoraError(
                f"Run {target} was trained on {key.describe(self.key or key)}, but this server holds {held}. "
                "Start another `llama-lora serve` for it (on its own --port)."
            )
        # A shared lock on the run while its files are read: refused while train, merge or eval writes it
        # (never a half-written run); none on a read-only file system, where nothing can write it.
        try:
            lock = run.read_lock("serve")
        except LlamaLoraError as e:
            raise RunBusy(str(e)) from None
        with lock:
            try:
                tokenizer = model_lib.load_tokenizer(str(run.tokenizer) if run.tokenizer.is_dir() else base,
                                                     cfg.model)
                fmt = runs.read_prompt_format(target, cfg, tokenizer)
            except (OSError, ValueError, TypeError, KeyError) as e:  # what a damaged file raises there
                raise LlamaLoraError(
                    f"Could not read the run {target} ({_one_line(e)}): its prompt.json or tokenizer/ is damaged. "
                    "Restore it from a copy of the run, or train the run again."
                ) from e
            adapter = self._load_adapter(run.adapter)
        try:
            self.model.eval()
            loaded = Loaded(self.model, tokenizer, fmt, target, base, self.runtime.device)
            _check_applied(self.model, adapter, loaded)
        except LlamaLoraError:
            self._drop_adapter(adapter)
            raise
        entry = Entry(name, loaded, cfg, adapter, int(time.time()))
        for e in self.entries.values():  # every entry shares the model object (replaced on the first adapter)
            e.loaded.model = self.model
        self.entries[name] = entry
        log.info("Serving %s as '%s' (prompt format %s)", target, name, fmt.kind)
        return entry

    def remove(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None or entry.adapter is None:
            raise LlamaLoraError(f"'{name}' is not a served adapter (served: {', '.join(self.adapters()) or 'none'}).")
        del self.entries[name]
        self._drop_adapter(entry.adapter)
        log.info("Stopped serving '%s'", name)

    def adapters(self) -> list[str]:
        return [n for n, e in self.entries.items() if e.adapter is not None]

    @contextlib.contextmanager
    def activate(self, entry: Entry):
        """The shared model with `entry`'s adapter on (or every adapter off, for the base)."""
        if not hasattr(self.model, "disable_adapter"):
            yield self.model
        elif entry.adapter is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(entry.adapter)
            yield self.model

    # ------------------------------------------------------------------------------------------------

    def _load_adapter(self, adapter_dir: Path) -> str:
        # PEFT adapter names become module keys (no dots allowed), so they are ours, not the run names.
        if not hasattr(self.model, "disable_adapter"):
            self.model = runs.load_adapter(self.model, adapter_dir)  # a PeftModel with adapter "default"
            return "default"
        name = f"adapter{self._next_adapter}"
        self._next_adapter += 1
        try:
            self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        except Exception as e:
            raise LlamaLoraError(
                f"Could not load the adapter in {adapter_dir} ({_one_line(e)}). Its files are missing or "
                "corrupted, or it was trained on another base model."
            ) from e
        return name

    def _drop_adapter(self, adapter: str) -> None:
        if len(self.model.peft_config) == 1:  # PEFT cannot delete its last adapter: unwrap the base instead
            self.model = self.model.unload()
            for e in self.entries.values():
                e.loaded.model = self.model
        else:
            self.model.delete_adapter(adapter)


def check_finished(target: Path) -> None:
    """Refuse a llama-lora run whose training did not finish, saying what state it is in and how to finish it
    (nothing for a folder that is not a llama-lora run: the caller says what it is)."""
    run = RunDir(target)
    if run.is_owned() and not run.is_finished():
        raise LlamaLoraError(runs.unfinished_message(run))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


@torch.no_grad()
def _check_applied(model, adapter: str, loaded: Loaded) -> None:
    """Refuse an adapter that does not change the model's logits: it would be answered by the plain base."""
    from llama_lora.merge import sample_logits

    tok = loaded.tokenizer
    batch = tok([loaded.fmt.prompt(tok, *PROBE)], add_special_tokens=False, return_tensors="pt")
    model.set_adapter(adapter)
    with_adapter = sample_logits(model, batch)
    with model.disable_adapter():
        without = sample_logits(model, batch)
    change = float((with_adapter - without).abs().max())
    scale = max(1.0, float(without.abs().max()))
    if not torch.isfinite(with_adapter).all():
        raise LlamaLoraError(f"The adapter of {loaded.target} gives non-finite logits (NaN/inf weights). Re-train it.")
    if change <= 1e-6 * scale:
        raise LlamaLoraError(
            f"The adapter of {loaded.target} does not change the base model's output on a probe prompt (largest "
            f"logit change {change:.2g}): requests for it would be answered by the plain base. Its weights are "
            "zero (an untrained adapter?) or its target_modules do not match this base. Re-train it."
        )
    log.info("Adapter of %s applied: probe logits move by up to %.3g", loaded.target.name, change)
