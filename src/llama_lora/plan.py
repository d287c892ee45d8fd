"""The plan of a training run: what it will be, decided once and read by everyone who needs it.

`plan_run(cfg, capabilities, sharded)` decides the runtime (device, precision, weight dtype, attention,
CUDA extras, CPU malloc mode: model.choose_runtime), refuses what cannot run together (a quantized base or
PiSSA/OLoRA under FSDP/DeepSpeed), decides the lean LoRA/DoRA step (lean.decide), and says how the loss
over the vocabulary is computed (`loss_chunk`). train builds its Accelerator and model from it, validate
reports it, and the memory planner (planner.py) sums the memory of exactly this plan; the batch split is
the planner's, from this plan and the tokenized lengths (planner.batch_split).

A plan for a device this machine does not have (validate or a benchmark planning for a GPU from a
laptop) comes from `plan_for_device`, with the capabilities of a typical machine of that kind: the one
place where capabilities are made up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from llama_lora import lean as lean_lib, model as model_lib
from llama_lora.adapter import MUTATES_BASE
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.lean import LeanPolicy
from llama_lora.loss import chunk_positions
from llama_lora.model import Capabilities, Runtime


@dataclass(frozen=True)
class RunPlan:
    """Everything a run will be before anything is loaded. runtime.lean is the training step's policy."""

    runtime: Runtime
    sharded: bool  # FSDP or DeepSpeed: parameters sharded across processes
    loss_chunk_size: int | None  # training.loss_chunk_size as configured (None: by vocabulary)

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def lean(self) -> LeanPolicy:
        return self.runtime.lean

    def loss_chunk(self, vocab_size: int) -> int:
        """Response positions per chunk of the loss over a `vocab_size` vocabulary (0: one cross-entropy).
        Sharded runs keep one: the chunks read lm_head's weight outside its module's forward, which
        FSDP/DeepSpeed only gather inside."""
        return 0 if self.sharded else chunk_positions(self.loss_chunk_size, vocab_size)


def sharded_launch() -> bool:
    """Whether this process was launched to shard the model (accelerate launch with an FSDP or DeepSpeed
    config sets these variables; the Accelerator then agrees)."""
    flags = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes") for f in flags)


class PlanError(LlamaLoraError):
    """What cannot run, and which part of the plan said so (`part`: 'device' or 'training step'), so that
    validate reports it under that name."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


def plan_run(cfg: Config, caps: Capabilities, sharded: bool = False) -> RunPlan:
    """The plan of training `cfg` on a machine with `caps`; PlanError for what cannot run there."""
    try:
        runtime = model_lib.choose_runtime(cfg.training, cfg.model, caps)
        model_lib.check_sharding(cfg.model.quantization, sharded)  # FSDP/DeepSpeed + a bitsandbytes base
    except LlamaLoraError as e:
        raise PlanError(str(e), "device") from e
    if sharded and cfg.peft.init in MUTATES_BASE:
        raise PlanError(
            f"peft.init={cfg.peft.init} is not supported under FSDP/DeepSpeed: it rewrites the base weights, and "
            "converting the saved adapter back to a plain LoRA needs the whole adapter on one process. Train it "
            "with DDP or one process, or use peft.init=default / gaussian.", "training step")
    try:
        policy = lean_lib.decide(cfg.peft, runtime.device, runtime.precision, sharded, cfg.model.quantization)
    except LlamaLoraError as e:
        raise PlanError(str(e), "training step") from e
    return RunPlan(dataclasses.replace(runtime, lean=policy), sharded, cfg.training.loss_chunk_size)


def capabilities_of(device: str) -> Capabilities:
    """A typical machine with `device` ('cpu', 'cuda', 'mps'): an Ampere-class GPU for cuda, this host's malloc."""
    cuda = device == "cuda"
    return Capabilities(cuda=cuda, cuda_device_count=int(cuda), cuda_bf16=cuda, cuda_capability=(8, 0) if cuda else (0, 0),
                        mps=device == "mps", glibc=model_lib.has_glibc(), malloc_override=model_lib.malloc_override(),
                        bitsandbytes=True)  # a plan needs no install; train and validate check it


def plan_for_device(cfg: Config, device: str, lean: LeanPolicy | None = None) -> RunPlan:
    """The plan of `cfg` on a typical machine with `device`, for planning where the run is not (`lean`: a
    given step policy instead of the one decided). The CPU kernel is not asked for: it changes no memory,
    and a plan builds nothing."""
    device = "cuda" if device.startswith("cuda") else device
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"device": device}),
                                 "peft": cfg.peft.model_copy(update={"lean_kernel": False})})
    plan = plan_run(cfg, capabilities_of(device))
    return plan if lean is None else dataclasses.replace(plan, runtime=dataclasses.replace(plan.runtime, lean=lean))
