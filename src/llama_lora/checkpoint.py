"""Training checkpoints: the loop's state, and save / load / gather of everything a resume needs.

A checkpoint `checkpoints/step-NNNNNN/` holds the adapter (standard PEFT files), the optimizer,
scheduler and every process's RNG state, and `trainer_state.json` (a TrainState), written last: a
folder without it is incomplete and never resumed from. Saves are atomic (artifacts.atomic_dir).
Under FSDP/DeepSpeed the adapter and optimizer state are gathered whole onto the main process, so a
checkpoint is the same files whatever the sharding. Before a resume, `changes_since_start` checks that the
run is resumed with the settings and data it started with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import shutil
from array import array
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from llama_lora import artifacts
from llama_lora.artifacts import RunDir
from llama_lora.config.load import config_diff, load_config_file
from llama_lora.config.schema import RESUME_MAY_CHANGE
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class TrainState:
    """Everything the loop carries from one optimizer step to the next, and exactly what a checkpoint
    saves: a resumed run logs what the uninterrupted one would (e.g. a loss window spanning the kill)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens trained on, all processes
    response_tokens: int = 0  # of which response tokens (the loss is over these)
    train_time: float = 0.0  # seconds inside steps (not evaluation or saving)
    eval_loss_before: float | None = None  # eval loss of the base + freshly initialised adapter
    eval_loss: float | None = None  # latest eval loss
    train_loss: float | None = None  # mean step loss of the latest logging window
    window_loss: float = 0.0  # running sum and count of the current logging window
    window_steps: int = 0
    # What the steps are computed from beyond config.yaml (train.training_inputs): the tokenized training
    # data, the global batch and the precision that ran. A resume compares it (None: an older checkpoint).
    inputs: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def training_inputs(examples: list[dict], global_batch: int, precision: str) -> dict[str, Any]:
    """What the steps are computed from besides config.yaml's settings: the tokenized training examples
    (their count and a hash of their token ids and labels: the data, its formatting and truncation),
    the global batch (over all processes) and the precision that ran. Saved in every checkpoint."""
    h = hashlib.sha256()
    for e in examples:
        ids, labels = array("q", e["input_ids"]), array("q", e["labels"])
        h.update(len(ids).to_bytes(8, "little") + ids.tobytes() + labels.tobytes())
    return {"training data": f"{len(examples)} tokenized examples, sha256:{h.hexdigest()[:16]}",
            "global batch": global_batch, "precision": precision}


def changes_since_start(run_dir: RunDir, path: Path, cfg, inputs: dict[str, Any]) -> list[str]:
    """What differs between the run as it started (its config.yaml; the inputs saved in the checkpoint
    at `path`) and the config and training_inputs() about to resume it: the one resume-compatibility check."""
    changes = []
    if run_dir.config.is_file():  # written by train.start() before the first checkpoint
        changes = config_diff(load_config_file(run_dir.config), cfg, RESUME_MAY_CHANGE)
    saved = TrainState.from_dict(artifacts.read_json(path / STATE_FILE)).inputs
    if saved is not None:  # None: a checkpoint from before inputs were recorded
        changes += config_diff(saved, inputs)
    return changes


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when FSDP (1 or 2) shards the model, however accelerate wrapped it."""
    from torch.distributed import fsdp

    kinds = tuple(getattr(fsdp, n) for n in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, n))
    return any(isinstance(m, kinds) for m in model.modules())


def gathered_adapter_state(accelerator: Accelerator, model) -> dict | None:
    """The trainable weights, whole, on the main process when the model is sharded; None otherwise
    (then the module holds them whole and save_pretrained reads them itself). Every process must call
    it: under FSDP/DeepSpeed it is a collective. The adapter saved from it is the standard PEFT one."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Trainable weights only: gathering the whole frozen base onto one CPU could not fit for the
        # models FSDP is used for.
        return get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    return None


def _gathered_optimizer_state(accelerator: Accelerator, model, optimizer) -> dict | None:
    """Optimizer state to save (main process). FSDP: gathered whole, keyed by parameter name, so a resume
    can re-shard it. DeepSpeed: None (the engine owns it; resuming DeepSpeed runs is refused)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    return optimizer.state_dict()


def _rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save(run_dir: RunDir, accelerator: Accelerator, model, optimizer, scheduler, state: TrainState,
         keep: int) -> str:
    """Write checkpoints/step-NNNNNN (every process calls it), keep the newest `keep`; return its path."""
    path = run_dir.checkpoints / f"step-{state.step:06d}"
    # Collectives first, on every process: a sharded model's gathered adapter and optimizer state, and
    # each process's RNG state (dropout masks differ per process; a resume must reproduce them all).
    adapter_state = gathered_adapter_state(accelerator, model)
    optimizer_state = _gathered_optimizer_state(accelerator, model, optimizer)
    rngs = gather_object([_rng_state()])
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        trainable = sum(p.numel() for p in optimizer.param_groups[0]["params"])
        artifacts.check_free_space(run_dir.path, 4 * trainable * 4 + 2**20)
        with artifacts.atomic_dir(path) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs[0], tmp / "rng.pt")
            for rank, rng in enumerate(rngs[1:], start=1):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            artifacts.write_json(tmp / STATE_FILE, dataclasses.asdict(state))  # written last: marks completeness
        for old in run_dir.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return str(path)


def load(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore adapter, optimizer, scheduler and RNG from `path`; return its TrainState.

    Any failure here means this checkpoint cannot be resumed (corrupted, or made with another
    model/adapter configuration), which the user must hear about rather than a traceback.
    """
    try:
        # Read onto the CPU (load_state_dict copies to each parameter's device): safetensors rejects the
        # "cpu:0" that accelerate names the device of a multi-process CPU run.
        adapter = load_file(str(path / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, adapter)
        # A missing adapter key loads silently and would resume with freshly initialised weights.
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"its adapter has {len(result.unexpected_keys)} unexpected and lacks {len(missing)} "
                             f"expected weights (e.g. {(result.unexpected_keys + missing)[0]})")
        # weights_only=True: a checkpoint can never execute code when loaded.
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if is_fsdp(model):  # saved whole (see _gathered_optimizer_state): each process takes its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        # Each process its own RNG stream; a checkpoint from a run with fewer processes falls back to rank 0's.
        rank_rng = path / f"rng-rank{PartialState().process_index}.pt"
        rng = torch.load(rank_rng if rank_rng.exists() else path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return TrainState.from_dict(artifacts.read_json(path / STATE_FILE))
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        reason = next((ln.strip() for ln in lines if "mismatch" in ln), lines[0])[:300]  # torch's detail is line 2
        raise LlamaLoraError(
            f"Cannot resume from the checkpoint {path} ({type(e).__name__}: {reason}). It is corrupted or was "
            "made with another model/adapter configuration: run with the model.* and peft.* settings the run "
            "started with, delete this checkpoint to resume from the one before, or start the run over "
            "with overwrite=true."
        ) from e
