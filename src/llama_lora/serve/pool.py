"""The models `llama-lora serve` answers with: one base in memory, each run's adapter on it (PEFT multi-adapter).

Each served name is an `Entry`: a run (its adapter, tokenizer and saved prompt format, loaded with the same
`runs` functions infer uses) or the plain base (the adapter switched off, with the first run's tokenizer and
prompt format: the base as its runs saw it, like `baseline`). Only the engine's worker thread calls the
methods that touch the model (`add`, `remove`, `activate`), so switching adapters never races a generation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
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


def _model_key(cfg: Config, base: str) -> tuple:
    """What must agree for runs to share one base copy in memory."""
    m = cfg.model
    return (str(Path(base).resolve()) if Path(base).exists() else base, m.revision, m.dtype,
            getattr(m, "quantization", None))


class Pool:
    """Loads runs that share one base; names -> entries. Not thread-safe: the engine's worker owns it."""

    def __init__(self, cfgs: list[Config]):
        if not cfgs:
            raise LlamaLoraError("Nothing to serve: name at least one run directory.")
        self.entries: dict[str, Entry] = {}
        self._next_adapter = 0
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
            inside_run = target.name == "merged" and (target.parent / "run.json").is_file()
            name = f"{target.parent.name}-merged" if inside_run else target.name  # `llama-lora merge` output
            self.entries[name] = Entry(name, loaded, first, None, int(time.time()))
            self.context_length = _context_length(self.model)
            return
        for c in cfgs:  # before the base is loaded: a run still training is refused at once
            _check_finished(runs.resolve(c.infer.run_dir, c.output_dir))
        bases = [(runs.base_model_of(runs.resolve(c.infer.run_dir, c.output_dir), c), c) for c in cfgs]
        keys = {_model_key(c, b) for b, c in bases}
        if len(keys) > 1:
            listing = "; ".join(f"{c.infer.run_dir} on {b}" for b, c in bases)
            raise LlamaLoraError(
                f"These runs were trained on different base models ({listing}). One server holds one base in "
                "memory and serves the adapters trained on it: start one `llama-lora serve` per base (each on "
                "its own --port), or merge a run (`llama-lora merge`) and serve the merged model alone."
            )
        self.base, self.key = bases[0][0], keys.pop()
        log.info("Loading the base model %s once for %d run(s)", self.base, len(cfgs))
        self.model = model_lib.load_model(self.base, first.model, self.runtime, training=False).eval()
        self.context_length = _context_length(self.model)
        for cfg in cfgs:
            self.add(cfg)
        base_loaded = next(iter(self.entries.values())).loaded
        name = _base_id(self.base)
        self.entries[name] = Entry(name, base_loaded, first, None, int(time.time()))

    # ------------------------------------------------------------------------------------------------

    def add(self, cfg: Config, name: str | None = None) -> Entry:
        """Load a finished run's adapter onto the shared base, probe it, and serve it under its run name."""
        target = runs.resolve(cfg.infer.run_dir, cfg.output_dir)
        name = name or target.name
        if not runs.is_run_dir(target):
            raise LlamaLoraError(f"{target} is a standalone model, not a run with an adapter: it cannot be "
                                 "added to a running server. Serve it with its own `llama-lora serve`.")
        if name in self.entries:
            raise LlamaLoraError(f"A model named '{name}' is already served. Remove it first, or give another name.")
        run = RunDir(target)
        _check_finished(target)
        base = runs.base_model_of(target, cfg)
        if self.key is None or _model_key(cfg, base) != self.key:
            raise LlamaLoraError(
                f"Run {target} was trained on {base}, but this server holds {self.base or 'a merged model'}. "
                "Start another `llama-lora serve` for it (on its own --port)."
            )
        # The run lock (held by train, merge, eval) while its files are read: never load a half-written run.
        try:
            lock = run.read_lock("serve")
        except LlamaLoraError as e:
            raise RunBusy(str(e)) from None
        with lock:
            tokenizer = model_lib.load_tokenizer(str(run.tokenizer) if run.tokenizer.is_dir() else base, cfg.model)
            fmt = runs.read_prompt_format(target, cfg, tokenizer)
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
            text = f"{type(e).__name__}: {e}".splitlines()[0]
            raise LlamaLoraError(
                f"Could not load the adapter in {adapter_dir} ({text}). Its files are missing or corrupted, or "
                "it was trained on another base model."
            ) from e
        return name

    def _drop_adapter(self, adapter: str) -> None:
        if len(self.model.peft_config) == 1:  # PEFT cannot delete its last adapter: unwrap the base instead
            self.model = self.model.unload()
            for e in self.entries.values():
                e.loaded.model = self.model
        else:
            self.model.delete_adapter(adapter)


def _check_finished(target: Path) -> None:
    run = RunDir(target)
    if runs.is_run_dir(target) and not run.is_finished():
        raise LlamaLoraError(
            f"Run {target} has not finished training (status '{run.status().get('status', 'unknown')}'). "
            "Serve it once `llama-lora train` has finished it."
        )


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
