"""`llama-lora train`: run(cfg) -> run directory. Setup -> resume -> loop -> finish, top to bottom.

The loop is written out (no Trainer) so that every step is visible: deterministic data order that a
resume can reproduce exactly (sampler.py), loss normalised over the response tokens of the whole global
batch, padding-free packing, signals and non-finite guards. accelerate supplies device placement, mixed
precision, DDP/FSDP and the trackers, so `accelerate launch` / `torchrun` work unchanged. What the loop
carries between steps is a TrainState, and a checkpoint saves exactly that (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, get_scheduler

from llama_lora import artifacts, checkpoint, data as data_lib, model as model_lib, tracking
from llama_lora.adapter import apply_adapter, count_parameters, initial_adapter_state, save_adapter
from llama_lora.artifacts import RunDir
from llama_lora.attention import VARLEN_ATTENTION, use_varlen_attention
from llama_lora.checkpoint import TrainState
from llama_lora.config.load import to_yaml
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.loss import response_loss_sum
from llama_lora.plan import plan_run, sharded_launch
from llama_lora.planner import batch_split
from llama_lora.sampler import StepSampler
from llama_lora.scoring import loss_sums

log = logging.getLogger("llama_lora.train")


def run(cfg: Config) -> Path:
    t_start = time.time()
    with contextlib.ExitStack() as held:  # the run lock (one writer per run), released however run() ends
        s = setup(cfg, held)  # runtime, run directory (locked), data, model + adapter, batch split, optimizer
        state = resume(s)  # the newest checkpoint's state, or a fresh one
        start(s, state)  # config.yaml (the config that runs), prompt.json, run.json, trackers
        if state.eval_loss_before is None:
            state.eval_loss_before = evaluate(s)
            log.info("Eval loss before training: %.4f", state.eval_loss_before)
            tracking.log(s.trackers, {"eval/loss": state.eval_loss_before}, 0)
        train_loop(s, state)  # to the last step, or checkpoint and exit on a signal
        try:
            finish(s, state, t_start)  # adapter, tokenizer, metrics; the checkpoints go
        except Exception as e:
            _keep_trained_state(s, state, e)
            raise
    return s.run_dir.path


def _keep_trained_state(s: Session, state: TrainState, error: Exception) -> None:
    """finish() failed after every step ran: save the final state as a checkpoint (one process: no
    collective can hang) and mark the run failed, so a rerun resumes at the end instead of retraining."""
    if not s.accelerator.is_main_process:
        return
    if s.accelerator.num_processes == 1 and not (s.last_checkpoint or "").endswith(f"step-{state.step:06d}"):
        try:
            s.last_checkpoint = checkpoint.save(s.run_dir, s.accelerator, s.model, s.optimizer, s.scheduler,
                                                state, s.cfg.training.keep_checkpoints)
        except Exception as save_error:  # the original error is the one to report
            log.warning("Could not save the final state as a checkpoint: %s", save_error)
    s.run_dir.set_status("failed", step=state.step, checkpoint=s.last_checkpoint,
                         error=f"saving the result failed: {type(error).__name__}: {error}"[:1000])


@dataclass
class Session:
    """What setup() builds and the loop reads: the run's objects in one place."""

    cfg: Config  # the config that runs (auto_batch_size applied): what config.yaml records
    runtime: model_lib.Runtime  # device, precision, attention, the lean-step policy
    accelerator: Accelerator
    run_dir: RunDir
    base_path: str  # the base model, resolved (local path or hub id)
    tokenizer: Any
    fmt: data_lib.PromptFormat
    train_examples: list[dict]
    eval_examples: list[dict]
    data_stats: dict[str, Any]  # per split: truncation and empty-row counts, for metrics.json
    collate: Callable
    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: StepSampler
    total_steps: int
    trainable: int
    total: int
    sharded: bool  # FSDP or DeepSpeed
    last_checkpoint: str | None = None
    trackers: list[GeneralTracker] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)  # training_inputs(): what a resume must find unchanged
    resume_changes: list[str] = field(default_factory=list)  # what changed, when resumed despite changes
    loss_chunk: int = 0  # response positions per chunk of the loss (training.loss_chunk_size resolved; 0: one)
    initial_adapter: dict | None = None  # pissa/olora: the adapter as initialised, for the conversion at save


# ----------------------------------------------------------------------------------------------------
# Setup


def setup(cfg: Config, held: contextlib.ExitStack) -> Session:
    tc = cfg.training
    # The run's plan, decided once before anything is written (peft.lean_kernel=true that cannot build
    # fails here): the Accelerator, the model, the planner and the log all read it.
    plan = plan_run(cfg, model_lib.probe_capabilities(), sharded_launch())
    runtime = plan.runtime
    accelerator = Accelerator(
        cpu=runtime.device == "cpu",
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[runtime.precision],
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded != plan.sharded:  # the launcher's variables and the Accelerator disagree: never guess
        raise LlamaLoraError(
            f"The launch {'shards' if sharded else 'does not shard'} the model, but its environment said "
            f"otherwise (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED). Launch with `accelerate launch "
            "--config_file ...` (docs/distributed.md), or unset those variables.")
    _configure_rank_logging(accelerator)

    # A finished run is never silently overwritten; an unfinished one is resumed.
    run_dir = _prepare_run_dir(cfg, accelerator, held)
    if accelerator.is_main_process:
        _add_file_log(run_dir.log)
    log.info("Run directory %s", run_dir.path)
    log.info("Runtime: %s", runtime.reason)
    model_lib.apply_process_settings(runtime)  # TF32 on CUDA, malloc that keeps freed memory on CPU

    # Tokenizer and data first: a data mistake fails in seconds, before a large model is loaded. The
    # main process goes first where a cache gets filled (the embedded model and data are built on first
    # use, datasets writes its Arrow cache); the other processes then only read it.
    with accelerator.main_process_first():
        base_path = model_lib.resolve_model_path(cfg.model.name_or_path)
        tokenizer = model_lib.load_tokenizer(base_path, cfg.model)
        data_lib.check_positions(cfg.data, AutoConfig.from_pretrained(
            base_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code))
        fmt = data_lib.PromptFormat.choose(cfg.data, tokenizer)
        train_ds, eval_ds = data_lib.load_train_eval(cfg.data, tc.seed)
    train_examples, train_stats = data_lib.tokenize_dataset(train_ds, cfg.data, tokenizer, fmt, "train")
    eval_examples, eval_stats = data_lib.tokenize_dataset(eval_ds, cfg.data, tokenizer, fmt, "eval")
    eval_examples = eval_examples[: cfg.data.max_eval_examples]

    # Model and adapter, seeded so the adapter init is reproducible. Under FSDP/DeepSpeed the weights stay
    # on the CPU until prepare() shards them: moving the whole model to one GPU first would defeat sharding.
    set_seed(tc.seed)
    load_runtime = dataclasses.replace(runtime, device="cpu") if sharded else runtime
    model = model_lib.load_model(base_path, cfg.model, load_runtime, training=True)
    model = apply_adapter(model, cfg.peft, lean=runtime.lean)
    initial_adapter = initial_adapter_state(model, cfg.peft)
    # Decided once: the loss over the vocabulary in chunks (loss.py). Sharded runs keep one cross-entropy:
    # the chunks read lm_head's weight outside its module's forward, which FSDP/DeepSpeed only gather inside.
    vocab = model.get_base_model().get_output_embeddings().out_features
    loss_chunk = plan.loss_chunk(vocab)
    log.info("Loss over the %s-token vocabulary: %s.", f"{vocab:,}",
             f"chunks of {loss_chunk} response positions" if loss_chunk else
             "one cross-entropy" + (" (FSDP/DeepSpeed)" if sharded and cfg.training.loss_chunk_size != 0 else ""))
    if cfg.data.packing and use_varlen_attention(model):
        log.info("Packed rows use per-example attention (%s): no T x T mask, no cross-example blocks.", VARLEN_ATTENTION)
    trainable, total = count_parameters(model)

    # The batch split that runs (on CUDA by default the planner's micro-batch): what config.yaml records.
    cfg, chosen = batch_split(cfg, model.get_base_model().config, plan, [len(e["input_ids"]) for e in train_examples])
    if chosen:
        log.info(chosen)
    tc = cfg.training
    sampler = StepSampler(train_examples, tc.seed, tc.micro_batch_size, tc.gradient_accumulation_steps,
                          accelerator.num_processes, accelerator.process_index,
                          group_by_length=cfg.data.group_by_length and not cfg.data.packing)
    if sampler.steps_per_epoch == 0:
        raise LlamaLoraError(
            f"The training data has {len(train_examples)} examples, fewer than one global batch "
            f"({tc.micro_batch_size} micro x {tc.gradient_accumulation_steps} accumulation x "
            f"{accelerator.num_processes} processes). "
            "Lower training.micro_batch_size or training.gradient_accumulation_steps, or add data."
        )
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_epochs * sampler.steps_per_epoch))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=tc.learning_rate, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2),
        fused=runtime.fused_adamw or None,
    )
    scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=round(tc.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Session(
        cfg=cfg, runtime=runtime, accelerator=accelerator, run_dir=run_dir, base_path=base_path, tokenizer=tokenizer,
        fmt=fmt, train_examples=train_examples, eval_examples=eval_examples,
        data_stats={"train": train_stats, "eval": eval_stats},
        collate=data_lib.make_collate(cfg.data.packing, tokenizer.pad_token_id), model=model, params=params,
        optimizer=optimizer, scheduler=scheduler, sampler=sampler, total_steps=total_steps, trainable=trainable,
        total=total, sharded=sharded, loss_chunk=loss_chunk, initial_adapter=initial_adapter,
        inputs=checkpoint.training_inputs(train_examples, sampler.global_batch, runtime.precision),
    )


def resume(s: Session) -> TrainState:
    """The newest complete checkpoint of this run restored into the model and optimizer, else step 0."""
    checkpoints = s.run_dir.checkpoint_dirs()
    if not checkpoints or s.cfg.training.resume != "auto":
        return TrainState(inputs=s.inputs)
    if s.accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise LlamaLoraError(
            f"{s.run_dir.path} holds checkpoints, but resuming a DeepSpeed run is not supported (its optimizer "
            "state lives inside the engine). Resume with FSDP or DDP (configs/accelerate/), use a checkpoint's "
            "adapter as is, or start again with overwrite=true."
        )
    # Checked before anything is loaded or written: a refused resume leaves the run as it was.
    changes = checkpoint.changes_since_start(s.run_dir, checkpoints[-1], s.cfg, s.inputs)
    if changes and not s.cfg.training.resume_despite_changes:
        more = f"; and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise LlamaLoraError(
            f"{s.run_dir.path} holds an unfinished run started with other settings or data "
            f"({'; '.join(changes[:4])}{more}); resuming would continue its checkpoint with them. Run with the "
            "settings it started with (its config.yaml), pass overwrite=true to start it over (or choose another "
            "run_name=...), or pass training.resume_despite_changes=true to continue from its checkpoint on purpose."
        )
    if changes:
        log.warning("Resuming %s despite changes since it started (training.resume_despite_changes=true): %s",
                    s.run_dir.path, "; ".join(changes))
        s.resume_changes = changes
    state = checkpoint.load(checkpoints[-1], s.accelerator.unwrap_model(s.model), s.optimizer, s.scheduler)
    state.inputs = s.inputs  # what it trains on from here: what the next resume compares with
    s.last_checkpoint = str(checkpoints[-1])
    log.info("Resumed from %s (step %d of %d)", checkpoints[-1], state.step, s.total_steps)
    return state


def start(s: Session, state: TrainState) -> None:
    """Write what describes the run (before the first step, so infer/eval can read a running run's
    settings) and open the trackers."""
    cfg, tc = s.cfg, s.cfg.training
    if s.accelerator.is_main_process:
        artifacts.write_text(s.run_dir.config, to_yaml(cfg))
        artifacts.write_json(s.run_dir.prompt, s.fmt.to_dict())
        s.run_dir.set_status("running", base_model=s.base_path, base_model_id=cfg.model.name_or_path,
                             pid=os.getpid(), total_steps=s.total_steps,
                             **({"resumed_despite_changes": s.resume_changes} if s.resume_changes else {}))
        # Steps after the checkpoint were (maybe) logged by the killed run and will be logged again: purge them.
        s.trackers = tracking.start(cfg, s.run_dir, purge_step=state.step + 1 if state.step else 0)
    log.info(
        "Training %d steps: %d examples, global batch %d (%d x %d accumulation x %d processes), packing=%s, "
        "%s trainable of %s parameters", s.total_steps, len(s.train_examples), s.sampler.global_batch,
        tc.micro_batch_size, tc.gradient_accumulation_steps, s.accelerator.num_processes, cfg.data.packing,
        f"{s.trainable:,}", f"{s.total:,}",
    )


# ----------------------------------------------------------------------------------------------------
# The loop


def train_loop(s: Session, state: TrainState) -> None:
    tc, main = s.cfg.training, s.accelerator.is_main_process
    stop = _StopOnSignal()
    s.model.train()
    # The bar is for terminals; CI logs and files get the periodic log lines instead.
    progress = tqdm(total=s.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (main and sys.stderr.isatty()))
    try:
        while state.step < s.total_steps:
            t0 = time.time()
            step = state.step + 1
            loss, response_tokens, tokens = train_step(s, step)
            if not math.isfinite(loss):
                if main:
                    s.run_dir.set_status("failed", error=f"non-finite loss at step {step}",
                                         checkpoint=s.last_checkpoint)
                raise LlamaLoraError(
                    f"The training loss became {loss} at step {step}; stopped without saving. "
                    f"Last good checkpoint: {s.last_checkpoint or 'none'}. Lower training.learning_rate, check the "
                    "data, or use training.precision=fp32 / bf16 instead of fp16."
                )
            state.step = step
            state.response_tokens += response_tokens
            state.tokens += tokens
            state.train_time += time.time() - t0
            state.window_loss += loss
            state.window_steps += 1
            progress.update(1)
            lr = s.scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

            last = step == s.total_steps
            if step % tc.log_every == 0 or last:
                state.train_loss = state.window_loss / state.window_steps
                tps = state.tokens / max(state.train_time, 1e-9)
                tracking.log(s.trackers, {"train/loss": state.train_loss, "train/lr": lr,
                                          "train/tokens_per_second": tps}, step)
                log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, s.total_steps, state.train_loss, lr, tps)
                state.window_loss, state.window_steps = 0.0, 0
            if (tc.eval_every and step % tc.eval_every == 0) or last:
                state.eval_loss = evaluate(s)
                log.info("step %d eval loss %.4f", step, state.eval_loss)
                tracking.log(s.trackers, {"eval/loss": state.eval_loss}, step)
            stop.agree(s.accelerator)
            if (tc.save_every and step % tc.save_every == 0 and not last) or stop.requested:
                s.last_checkpoint = checkpoint.save(s.run_dir, s.accelerator, s.model, s.optimizer, s.scheduler,
                                                    state, tc.keep_checkpoints)
            if stop.requested:
                progress.close()
                if main:
                    s.run_dir.set_status("interrupted", step=step, checkpoint=s.last_checkpoint)
                    tracking.finish(s.trackers)
                log.warning("Stopped by %s at step %d; checkpoint saved to %s. Run the same command again to resume.",
                            stop.signal_name, step, s.last_checkpoint)
                raise SystemExit(128 + stop.signum)
    finally:
        progress.close()
        stop.restore()


def train_step(s: Session, step: int) -> tuple[float, int, int]:
    """One optimizer step over this process's micro-batches of the global batch `step`.

    Returns (mean response-token loss of the global batch, its response tokens, its input tokens).
    """
    accelerator, world, device = s.accelerator, s.accelerator.num_processes, s.accelerator.device
    micro_batches = s.sampler.batches(step)
    # (response tokens, input tokens) of this process's share; padding is never counted.
    counts = torch.tensor([[sum(l != data_lib.IGNORE_INDEX for l in e["labels"][1:]), len(e["input_ids"])]
                           for mb in micro_batches for e in mb], device=device).sum(0)
    # Normalise by the response tokens of the *global* batch: every token weighs the same whatever the
    # micro-batch or process it landed in (DDP averages gradients, hence the x world).
    global_count, global_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
    for i, mb in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=s.runtime.pin_memory) for k, v in s.collate(mb).items()}
        last = i == len(micro_batches) - 1
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.sync_gradients = last  # the engine reduces and steps only on the last micro-batch
        with accelerator.no_sync(s.model) if not last else contextlib.nullcontext(), accelerator.autocast():
            loss_sum, _ = response_loss_sum(s.model, batch, s.loss_chunk)
            if s.cfg.training.debug_nan_at_step == step:
                loss_sum = loss_sum * float("nan")
            accelerator.backward(loss_sum * world / max(global_count, 1))
        step_loss += loss_sum.detach().float()
    step_loss = accelerator.reduce(step_loss, reduction="sum").item() / max(global_count, 1)
    if math.isfinite(step_loss):
        if s.cfg.training.max_grad_norm > 0:
            # FSDP computes the norm over all shards only when handed the model's own parameter list.
            accelerator.clip_grad_norm_(s.model.parameters() if s.sharded else s.params, s.cfg.training.max_grad_norm)
        s.optimizer.step()
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, int(global_count), int(global_tokens)  # tokens of all processes: the job's throughput


def evaluate(s: Session) -> float:
    return _evaluate_sharded(s.model, s.eval_examples, s.collate, s.cfg.eval.batch_size, s.accelerator,
                             s.loss_chunk)


# ----------------------------------------------------------------------------------------------------
# Finish


def finish(s: Session, state: TrainState, t_start: float) -> None:
    """The adapter (plain PEFT format), tokenizer and metrics; then the run is marked finished."""
    adapter_state = checkpoint.gathered_adapter_state(s.accelerator, s.model)  # every process: a collective when sharded
    if s.accelerator.is_main_process:
        unwrapped = s.accelerator.unwrap_model(s.model)
        # adapter_config.json names the hub id (portable) or, for the embedded model, its cached path.
        portable = s.base_path if s.cfg.model.name_or_path == "embedded" else s.cfg.model.name_or_path
        unwrapped.peft_config[unwrapped.active_adapter].base_model_name_or_path = portable
        artifacts.check_free_space(s.run_dir.path, 2 * s.trainable * 4 + 50 * 2**20)
        with artifacts.atomic_dir(s.run_dir.adapter) as tmp:
            # pissa/olora: converted to the plain LoRA for the original base (adapter.save_adapter).
            save_adapter(unwrapped, tmp, adapter_state, s.initial_adapter)
            if s.runtime.quantization != "none":  # the adapter reproduces the model on this quantization only
                model_lib.record_quantization(tmp, s.runtime, portable)
        with artifacts.atomic_dir(s.run_dir.tokenizer) as tmp:
            s.tokenizer.save_pretrained(tmp)
        metrics = _metrics(s, state, t_start)
        artifacts.write_json(s.run_dir.metrics, metrics)
        # Checkpoints exist for resuming; a finished run keeps only its adapter. Marked finished first:
        # a kill in between leaves a finished run with spare checkpoints, never an unfinished one without.
        s.run_dir.set_status(artifacts.FINISHED, step=state.step)
        shutil.rmtree(s.run_dir.checkpoints, ignore_errors=True)
        tracking.finish(s.trackers)
        log.info("Finished in %.0fs: eval loss %.4f -> %.4f; adapter in %s", metrics["wall_time_s"],
                 metrics["eval_loss_before"], metrics["eval_loss"], s.run_dir.adapter)
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()


def _metrics(s: Session, state: TrainState, t_start: float) -> dict[str, Any]:
    return {
        "train_loss": state.train_loss,
        "eval_loss_before": state.eval_loss_before,
        "eval_loss": state.eval_loss,
        "eval_perplexity": math.exp(min(state.eval_loss, 50)) if state.eval_loss is not None else None,
        "steps": state.step,
        "tokens_seen": state.tokens,
        "response_tokens_seen": state.response_tokens,
        "tokens_per_second": state.tokens / max(state.train_time, 1e-9),
        "train_time_s": state.train_time,
        "wall_time_s": time.time() - t_start,
        "peak_memory_mb": _peak_memory_mb(s.runtime.device),
        "trainable_params": s.trainable,
        "total_params": s.total,
        "device": s.runtime.device,
        "precision": s.runtime.precision,
        "attn_implementation": s.runtime.attn_implementation,
        "data": {split: vars(st) | {"empty_row_indices": st.empty_row_indices[:20]} for split, st in s.data_stats.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Helpers of the flow above, in the order they are used.


def _configure_rank_logging(accelerator: Accelerator) -> None:
    """Only the main process narrates. The others keep warnings and errors (tagged with their rank),
    and no progress bars or library chatter: the main process shows the same lines once."""
    if accelerator.is_main_process:
        return
    import warnings

    import datasets
    import transformers

    rank = accelerator.process_index

    def tag(record: logging.LogRecord) -> bool:
        record.msg = f"[rank {rank}] {record.msg}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    logging.getLogger("llama_lora").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")


def _prepare_run_dir(cfg: Config, accelerator: Accelerator, held: contextlib.ExitStack) -> RunDir:
    # The default name holds a timestamp, which processes started a second apart would disagree on:
    # the main process picks it and tells the others. It alone checks and creates the folder, and its
    # verdict is shared too, so a refusal stops every process instead of leaving them at a barrier.
    name = broadcast_object_list([cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"])[0]
    run_dir = RunDir(Path(cfg.output_dir) / name)
    try:
        if accelerator.is_main_process:
            run_dir.check_trainable_here()  # before the lock file is made beside a folder that is not ours
            # One writer per run: locked before anything in it is checked, cleaned or written (a second
            # train/merge/eval of this run is refused, and this run refuses while one of them holds it).
            # Held until run() returns or raises (or the process dies).
            held.enter_context(run_dir.lock("train"))
            # A killed save leaves `.X.tmp-PID` (never complete: removed) or `.X.old-PID` (put back).
            for what in run_dir.prepare_for_training(cfg.overwrite, cfg.training.resume):
                log.info("Cleaned up after an interrupted save in %s: %s", run_dir.path, what)
            held.push(_mark_failed_on_error(run_dir))  # runs before the lock is released
        error = None
    except LlamaLoraError as e:
        error = str(e)
    error = broadcast_object_list([error])[0]
    if error:
        raise LlamaLoraError(error)
    return run_dir


def _mark_failed_on_error(run_dir: RunDir):
    """An exit callback: when run() ends with an error (a refused setting, a crash), a run.json that still
    says running says failed, with the error, so no later command takes the run for one in progress."""
    def on_exit(exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception) and run_dir.status().get("status") == "running":
            with contextlib.suppress(Exception):
                run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}"[:1000])
        return False  # the error goes on

    return on_exit


def _add_file_log(path: Path) -> None:
    logger = logging.getLogger("llama_lora")
    for old in [h for h in logger.handlers if getattr(h, "_llama_lora_run_log", False)]:
        logger.removeHandler(old)  # an earlier run in this process (tests, experiment) logs no more here
        old.close()
    handler = logging.FileHandler(path)
    handler._llama_lora_run_log = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:  # run(cfg) from Python with logging unconfigured: train.log
        logger.setLevel(logging.INFO)              # still gets the whole story


def _configure_deepspeed(accelerator: Accelerator, tc) -> None:
    """Tell the DeepSpeed engine what this loop does itself (untested here: it needs GPUs).

    The loop feeds micro-batches, marks the last one of each step (sync_gradients) and has already
    normalised the loss by the global batch's tokens, so the engine must neither divide by an
    accumulation count (gradient_accumulation_steps=1) nor expect a data loader to size its batch.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = tc.micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = tc.micro_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = tc.max_grad_norm


def _evaluate_sharded(model, examples, collate, batch_size: int, accelerator: Accelerator,
                      loss_chunk: int = 0) -> float:
    """Mean response-token loss over `examples`, each process scoring every world-th batch (scoring's loop)."""
    world, device = accelerator.num_processes, accelerator.device
    total, count = loss_sums(model, examples, collate, batch_size, device, loss_chunk, rank=accelerator.process_index,
                             world=world, autocast=accelerator.autocast)
    if world > 1:
        total, count = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=device),
                                          reduction="sum").tolist()
    return total / max(count, 1)


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit non-zero. Second: exit at once."""

    def __init__(self):
        self.requested, self.signum, self.signal_name = False, 0, ""
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested, self.signum, self.signal_name = True, signum, signal.Signals(signum).name
        print(f"\n{self.signal_name} received: saving a checkpoint after this step (again to exit now).",
              file=sys.stderr, flush=True)

    def agree(self, accelerator: Accelerator) -> None:
        """Under DDP every process must stop after the same step, whichever got the signal first."""
        if accelerator.num_processes > 1:
            got = accelerator.gather(torch.tensor([self.signum], device=accelerator.device)).max().item()
            if got and not self.requested:
                self.requested, self.signum, self.signal_name = True, got, signal.Signals(got).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["train", *sys.argv[1:]])
