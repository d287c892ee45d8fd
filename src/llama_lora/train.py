"""`llama-lora train`: run(cfg) -> run directory. Setup, then the loop, then the saves, top to bottom.

The loop is written out (no Trainer) so that every step is visible: deterministic data order that a
resume can reproduce exactly, loss normalised over the response tokens of the whole global batch,
padding-free packing, signals and non-finite guards. accelerate supplies device placement, mixed
precision and DDP, so `accelerate launch` / `torchrun` work unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, gather_object
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from llama_lora import artifacts, data as data_lib, model as model_lib
from llama_lora.adapter import apply_adapter, count_parameters
from llama_lora.artifacts import RunDir
from llama_lora.config.load import to_yaml
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.evaluate import response_loss_sum
from llama_lora.kernels import lean_kernel_enabled, prepare_for_training

log = logging.getLogger("llama_lora.train")


def run(cfg: Config) -> Path:
    t_start = time.time()
    tc = cfg.training
    caps = model_lib.probe_capabilities()
    runtime = model_lib.choose_runtime(tc, cfg.model, caps)
    lean_kernel_enabled(cfg.peft, runtime.device)  # peft.lean_kernel=true that cannot build fails here, first
    accelerator = Accelerator(
        cpu=runtime.device == "cpu",
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[runtime.precision],
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main = accelerator.is_main_process
    world = accelerator.num_processes
    _configure_rank_logging(accelerator)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    # ---- run directory: new, resumed, or refused (a finished run is never silently overwritten)
    run_dir = _prepare_run_dir(cfg, accelerator)
    if main:
        _add_file_log(run_dir.log)
    log.info("Run directory %s", run_dir.path)
    log.info("Runtime: %s", runtime.reason)
    model_lib.apply_process_settings(runtime)  # TF32 on CUDA, malloc that keeps freed memory on CPU

    # ---- tokenizer and data first: a data mistake fails in seconds, before a large model is loaded
    # The main process goes first where a cache gets filled (the embedded model and data are built on
    # first use, datasets writes its Arrow cache); the other processes then only read it.
    with accelerator.main_process_first():
        base_path = model_lib.resolve_model_path(cfg.model.name_or_path)
        tokenizer = model_lib.load_tokenizer(base_path, cfg.model)

        # ---- data: format, tokenize, mask
        fmt = data_lib.PromptFormat.choose(cfg.data, tokenizer)
        train_ds, eval_ds = data_lib.load_train_eval(cfg.data, tc.seed)
    train_examples, train_stats = data_lib.tokenize_dataset(train_ds, cfg.data, tokenizer, fmt, "train")
    eval_examples, eval_stats = data_lib.tokenize_dataset(eval_ds, cfg.data, tokenizer, fmt, "eval")
    eval_examples = eval_examples[: cfg.data.max_eval_examples]
    collate = data_lib.make_collate(cfg.data.packing, tokenizer.pad_token_id)

    # ---- model and adapter (seeded so the adapter init is reproducible)
    _seed_everything(tc.seed)
    # Under FSDP/DeepSpeed the weights stay on the CPU until prepare() shards them onto the devices:
    # moving the whole model to one GPU first would defeat sharding a model that does not fit one.
    load_runtime = dataclasses.replace(runtime, device="cpu") if sharded else runtime
    model = model_lib.load_model(base_path, cfg.model, load_runtime, training=True)
    model = apply_adapter(model, cfg.peft)
    # Varlen attention for packed rows and the fused LoRA/DoRA step (kernels.py); not under FSDP or
    # DeepSpeed, whose parameter sharding the fused step does not handle.
    prepare_for_training(model, cfg, lean=not sharded)
    trainable, total = count_parameters(model)

    if tc.auto_batch_size:
        # Largest micro-batch the memory planner says fits; accumulation keeps the configured global batch.
        from llama_lora.planner import auto_batch_size

        micro, accum, plan = auto_batch_size(cfg, model.get_base_model().config, runtime.device,
                                             [len(e["input_ids"]) for e in train_examples])
        log.info("auto_batch_size: micro-batch %d x %d accumulation (configured %d x %d); planned peak %.2f GiB "
                 "of %s", micro, accum, tc.micro_batch_size, tc.gradient_accumulation_steps, plan.total_bytes / 2**30,
                 f"{plan.available_bytes / 2**30:.2f} GiB" if plan.available_bytes else "unknown")
        tc = tc.model_copy(update={"micro_batch_size": micro, "gradient_accumulation_steps": accum})

    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world
    steps_per_epoch = len(train_examples) // global_batch
    if steps_per_epoch == 0:
        raise LlamaLoraError(
            f"The training data has {len(train_examples)} examples, fewer than one global batch "
            f"({tc.micro_batch_size} micro x {tc.gradient_accumulation_steps} accumulation x {world} processes). "
            "Lower training.micro_batch_size or training.gradient_accumulation_steps, or add data."
        )
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_epochs * steps_per_epoch))

    # ---- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=tc.learning_rate, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2),
        fused=runtime.fused_adamw or None,
    )
    scheduler = get_scheduler(
        tc.lr_scheduler, optimizer, num_warmup_steps=round(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    # ---- resume from the newest complete checkpoint of this run
    # Everything the loop carries from step to step lives in `state` (saved in every checkpoint), so a
    # resumed run logs exactly what the uninterrupted one would (e.g. a loss window spanning the kill).
    state = {"step": 0, "tokens": 0, "response_tokens": 0, "train_time": 0.0, "eval_loss_before": None,
             "window_loss": 0.0, "window_steps": 0}
    checkpoints = run_dir.checkpoint_dirs()
    if checkpoints and tc.resume == "auto":
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise LlamaLoraError(
                f"{run_dir.path} holds checkpoints, but resuming a DeepSpeed run is not supported (its optimizer "
                "state lives inside the engine). Resume with FSDP or DDP (configs/accelerate/), use a checkpoint's "
                "adapter as is, or start again with overwrite=true."
            )
        state |= _load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler, device)
        log.info("Resumed from %s (step %d of %d)", checkpoints[-1], state["step"], total_steps)

    if main:
        artifacts.write_text(run_dir.config, to_yaml(cfg))
        artifacts.write_json(run_dir.prompt, fmt.to_dict())
        run_dir.set_status("running", base_model=base_path, base_model_id=cfg.model.name_or_path,
                           pid=os.getpid(), total_steps=total_steps)
    # Steps after the checkpoint were (maybe) logged by the killed run and will be logged again: purge them.
    trackers = _Trackers(cfg, run_dir, purge_step=state["step"] + 1 if state["step"] else 0) if main else None
    log.info(
        "Training %d steps: %d examples, global batch %d (%d x %d accumulation x %d processes), packing=%s, "
        "%s trainable of %s parameters", total_steps, len(train_examples), global_batch, tc.micro_batch_size,
        tc.gradient_accumulation_steps, world, cfg.data.packing, f"{trainable:,}", f"{total:,}",
    )

    def evaluate() -> float:
        return _evaluate_sharded(model, eval_examples, collate, cfg.eval.batch_size, accelerator)

    if state["eval_loss_before"] is None:
        state["eval_loss_before"] = evaluate()
        log.info("Eval loss before training: %.4f", state["eval_loss_before"])
        if trackers:
            trackers.log({"eval/loss": state["eval_loss_before"]}, 0)

    # ---- the loop
    stop = _StopOnSignal()
    model.train()
    # The bar is for terminals; CI logs and files get the periodic log lines instead.
    progress = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
                    disable=not (main and sys.stderr.isatty()))
    eval_loss = None
    last_ckpt = str(checkpoints[-1]) if checkpoints and tc.resume == "auto" else None
    while state["step"] < total_steps:
        step = state["step"] + 1
        t0 = time.time()
        micro_batches = _step_batches(train_examples, step, steps_per_epoch, tc, accelerator, tc.seed,
                                      group_by_length=cfg.data.group_by_length and not cfg.data.packing)
        # (response tokens, input tokens) of this process's share; padding is never counted.
        counts = torch.tensor([[sum(l != data_lib.IGNORE_INDEX for l in e["labels"][1:]), len(e["input_ids"])]
                               for mb in micro_batches for e in mb], device=device).sum(0)
        # Normalise by the response tokens of the *global* batch: every token weighs the same whatever
        # the micro-batch or process it landed in (DDP averages gradients, hence the x world).
        global_count, global_tokens = accelerator.reduce(counts, reduction="sum").tolist()
        step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for i, mb in enumerate(micro_batches):
            batch = {k: v.to(device, non_blocking=runtime.pin_memory) for k, v in collate(mb).items()}
            last = i == len(micro_batches) - 1
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                accelerator.sync_gradients = last  # the engine reduces and steps only on the last micro-batch
            with accelerator.no_sync(model) if not last else _nullcontext(), accelerator.autocast():
                loss_sum, _ = response_loss_sum(model, batch)
                if tc.debug_nan_at_step == step:
                    loss_sum = loss_sum * float("nan")
                loss = loss_sum * world / max(global_count, 1)
                accelerator.backward(loss)
            step_loss += loss_sum.detach().float()
        step_loss = accelerator.reduce(step_loss, reduction="sum").item() / max(global_count, 1)
        if not math.isfinite(step_loss):
            stop.restore()
            if main:
                run_dir.set_status("failed", error=f"non-finite loss at step {step}", checkpoint=last_ckpt)
            raise LlamaLoraError(
                f"The training loss became {step_loss} at step {step}; stopped without saving. "
                f"Last good checkpoint: {last_ckpt or 'none'}. Lower training.learning_rate, check the data, "
                "or use training.precision=fp32 / bf16 instead of fp16."
            )
        if tc.max_grad_norm > 0:
            # FSDP computes the norm over all shards only when handed the model's own parameter list.
            accelerator.clip_grad_norm_(model.parameters() if sharded else params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["response_tokens"] += int(global_count)
        state["tokens"] += int(global_tokens)  # all processes: tokens/s is the whole job's throughput
        state["train_time"] += time.time() - t0
        state["window_loss"] += step_loss
        state["window_steps"] += 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        if step % tc.log_every == 0 or step == total_steps:
            state["train_loss"] = state["window_loss"] / state["window_steps"]
            tps = state["tokens"] / max(state["train_time"], 1e-9)
            if trackers:
                trackers.log({"train/loss": state["train_loss"], "train/lr": scheduler.get_last_lr()[0],
                              "train/tokens_per_second": tps}, step)
            log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, total_steps, state["train_loss"],
                     scheduler.get_last_lr()[0], tps)
            state["window_loss"], state["window_steps"] = 0.0, 0
        if (tc.eval_every and step % tc.eval_every == 0) or step == total_steps:
            eval_loss = evaluate()
            state["eval_loss"] = eval_loss
            log.info("step %d eval loss %.4f", step, eval_loss)
            if trackers:
                trackers.log({"eval/loss": eval_loss}, step)
        stop.agree(accelerator)
        if (tc.save_every and step % tc.save_every == 0 and step < total_steps) or stop.requested:
            last_ckpt = _save_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, tc.keep_checkpoints)
        if stop.requested:
            progress.close()
            if main:
                run_dir.set_status("interrupted", step=step, checkpoint=last_ckpt)
                trackers.close()
            log.warning("Stopped by %s at step %d; checkpoint saved to %s. Run the same command again to resume.",
                        stop.signal_name, step, last_ckpt)
            stop.restore()
            raise SystemExit(128 + stop.signum)
    progress.close()
    stop.restore()

    # ---- final saves: adapter (plain PEFT format), tokenizer, metrics
    adapter_state = _gathered_adapter_state(accelerator, model)  # every process: a collective when sharded
    if main:
        unwrapped = accelerator.unwrap_model(model)
        artifacts.check_free_space(run_dir.path, 2 * trainable * 4 + 50 * 2**20)
        with artifacts.atomic_dir(run_dir.adapter) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
            _point_adapter_at_base(tmp, cfg.model.name_or_path, base_path)
        with artifacts.atomic_dir(run_dir.tokenizer) as tmp:
            tokenizer.save_pretrained(tmp)
        metrics = {
            "train_loss": state.get("train_loss"),
            "eval_loss_before": state["eval_loss_before"],
            "eval_loss": state.get("eval_loss"),
            "eval_perplexity": math.exp(min(state["eval_loss"], 50)) if state.get("eval_loss") is not None else None,
            "steps": state["step"],
            "tokens_seen": state["tokens"],
            "response_tokens_seen": state["response_tokens"],
            "tokens_per_second": state["tokens"] / max(state["train_time"], 1e-9),
            "train_time_s": state["train_time"],
            "wall_time_s": time.time() - t_start,
            "peak_memory_mb": _peak_memory_mb(runtime.device),
            "trainable_params": trainable,
            "total_params": total,
            "device": runtime.device,
            "precision": runtime.precision,
            "attn_implementation": runtime.attn_implementation,
            "data": {"train": vars(train_stats) | {"empty_row_indices": train_stats.empty_row_indices[:20]},
                     "eval": vars(eval_stats) | {"empty_row_indices": eval_stats.empty_row_indices[:20]}},
        }
        artifacts.write_json(run_dir.metrics, metrics)
        # Checkpoints exist for resuming; a finished run keeps only its adapter. Marked finished first:
        # a kill in between leaves a finished run with spare checkpoints, never an unfinished one without.
        run_dir.set_status(artifacts.FINISHED, step=state["step"])
        shutil.rmtree(run_dir.checkpoints, ignore_errors=True)
        trackers.close()
        log.info("Finished in %.0fs: eval loss %.4f -> %.4f; adapter in %s", metrics["wall_time_s"],
                 metrics["eval_loss_before"], metrics["eval_loss"], run_dir.adapter)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir.path


# ----------------------------------------------------------------------------------------------------
# Helpers of the flow above, in the order they are used.


def _prepare_run_dir(cfg: Config, accelerator: Accelerator) -> RunDir:
    # The default name holds a timestamp, which processes started a second apart would disagree on:
    # the main process picks it and tells the others. It alone checks and creates the folder, and its
    # verdict is shared too, so a refusal stops every process instead of leaving them at a barrier.
    name = broadcast_object_list([cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"])[0]
    run_dir = RunDir(Path(cfg.output_dir) / name)
    try:
        if accelerator.is_main_process:
            _check_and_create_run_dir(cfg, run_dir)
        error = None
    except LlamaLoraError as e:
        error = str(e)
    error = broadcast_object_list([error])[0]
    if error:
        raise LlamaLoraError(error)
    return run_dir


def _check_and_create_run_dir(cfg: Config, run_dir: RunDir) -> None:
    """Refuse a finished run (unless overwrite), clear one being replaced, make sure the folder is writable."""
    if run_dir.path.exists():
        if run_dir.is_finished() and not cfg.overwrite:
            raise LlamaLoraError(
                f"Run directory {run_dir.path} holds a finished run. Choose another run_name=..., "
                "or pass overwrite=true to replace it."
            )
        if cfg.overwrite or (cfg.training.resume == "never"):
            if not cfg.overwrite and run_dir.checkpoint_dirs():
                raise LlamaLoraError(
                    f"Run directory {run_dir.path} holds an unfinished run with checkpoints and "
                    "training.resume=never. Use training.resume=auto to continue it, or overwrite=true."
                )
            shutil.rmtree(run_dir.path)
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        probe = run_dir.path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LlamaLoraError(
            f"Cannot write to the output directory {run_dir.path} ({e.strerror}). "
            "Choose a writable output_dir=... ."
        ) from e
    # A killed save leaves `.X.tmp-PID` (never complete: removed) or `.X.old-PID` (put back).
    for folder in (run_dir.path, run_dir.checkpoints):
        for what in artifacts.clean_stale(folder):
            log.info("Cleaned up after an interrupted save in %s: %s", folder, what)


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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


@torch.no_grad()
def _evaluate_sharded(model, examples, collate, batch_size: int, accelerator: Accelerator) -> float:
    """Mean response-token loss over `examples`, each process scoring every world-th batch.

    All processes run the same number of forward passes (a spare one repeats batch 0 and is not
    counted): under FSDP a forward is a collective, and a process that stopped early would hang the rest.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with accelerator.autocast():
        for j in range(rank, math.ceil(len(batches) / world) * world, world):
            batch = {k: v.to(device) for k, v in collate(batches[j if j < len(batches) else 0]).items()}
            loss, n = response_loss_sum(model, batch)
            if j < len(batches):
                total, count = total + float(loss), count + n
    model.train(was_training)
    if world > 1:
        total, count = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=device),
                                          reduction="sum").tolist()
    return total / max(count, 1)


def _step_batches(examples, step, steps_per_epoch, tc, accelerator, seed, group_by_length: bool = False):
    """This process's micro-batches for optimizer step `step` (1-based).

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted run would have, without saving any data-loader state.
    """
    epoch, index = divmod(step - 1, steps_per_epoch)
    world, rank, micro = accelerator.num_processes, accelerator.process_index, tc.micro_batch_size
    order = _epoch_order(examples, seed, epoch, micro * tc.gradient_accumulation_steps * world, group_by_length)
    start = index * micro * tc.gradient_accumulation_steps * world
    batches = []
    for k in range(tc.gradient_accumulation_steps):
        lo = start + (k * world + rank) * micro
        batches.append([examples[j] for j in order[lo : lo + micro]])
    return batches


_ORDER_CACHE: dict = {}


def _epoch_order(examples, seed: int, epoch: int, global_batch: int, group_by_length: bool) -> list[int]:
    """The epoch's example order: a seeded permutation; with group_by_length, each window of 16 global
    batches of it is sorted by length and its global batches shuffled (same generator), so a
    micro-batch holds examples of similar length (little padding) while steps still vary at random."""
    key = (id(examples), len(examples), seed, epoch, global_batch, group_by_length)
    if key in _ORDER_CACHE:
        return _ORDER_CACHE[key]
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    if group_by_length:
        window, grouped = 16 * global_batch, []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda j: len(examples[j]["input_ids"]), reverse=True)
            blocks = [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
            # A short last block (end of the data) stays last: steps take whole global batches from the front.
            full = [b for b in blocks if len(b) == global_batch]
            grouped += [j for b in torch.randperm(len(full), generator=g).tolist() for j in full[b]]
            grouped += [j for b in blocks if len(b) < global_batch for j in b]
        order = grouped
    _ORDER_CACHE.clear()  # one epoch at a time
    _ORDER_CACHE[key] = order
    return order


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Trackers:
    """TensorBoard (default) and optional Weights & Biases, logging the same scalars."""

    def __init__(self, cfg: Config, run_dir: RunDir, purge_step: int | None):
        self.tb = self.wandb = None
        if "tensorboard" in cfg.training.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint, so a resumed
            # curve continues instead of doubling back.
            self.tb = SummaryWriter(str(run_dir.tensorboard), purge_step=purge_step)
        if "wandb" in cfg.training.report_to:
            try:
                import wandb
            except ImportError as e:
                raise LlamaLoraError("training.report_to includes wandb but it is not installed: "
                                     "pip install 'llama-lora[wandb]'.") from e
            self.wandb = wandb.init(project=cfg.training.wandb_project, name=run_dir.path.name,
                                    id=run_dir.path.name, dir=str(run_dir.path), resume="allow",
                                    config=cfg.model_dump(mode="json"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


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


def _is_fsdp(model: torch.nn.Module) -> bool:
    """True when FSDP (1 or 2) shards the model, however accelerate wrapped it."""
    from torch.distributed import fsdp

    kinds = tuple(getattr(fsdp, n) for n in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, n))
    return any(isinstance(m, kinds) for m in model.modules())


def _gathered_adapter_state(accelerator: Accelerator, model) -> dict | None:
    """The trainable weights, whole, on the main process when the model is sharded; None otherwise
    (then the module holds them whole and save_pretrained reads them itself). Every process must call
    it: under FSDP/DeepSpeed it is a collective. The adapter saved from it is the standard PEFT one."""
    if _is_fsdp(model):
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
    if _is_fsdp(model):
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


def _save_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, keep) -> str | None:
    path = run_dir.checkpoints / f"step-{state['step']:06d}"
    # Collectives first, on every process: a sharded model's gathered adapter and optimizer state, and
    # each process's RNG state (dropout masks differ per process; a resume must reproduce them all).
    adapter_state = _gathered_adapter_state(accelerator, model)
    optimizer_state = _gathered_optimizer_state(accelerator, model, optimizer)
    rngs = gather_object([_rng_state()])
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        artifacts.check_free_space(run_dir.path, 4 * sum(p.numel() * 4 for p in optimizer.param_groups[0]["params"]) + 2**20)
        with artifacts.atomic_dir(path) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs[0], tmp / "rng.pt")
            for rank, rng in enumerate(rngs[1:], start=1):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            artifacts.write_json(tmp / "trainer_state.json", state)  # written last: marks completeness
        for old in run_dir.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return str(path)


def _load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict:
    """Restore adapter, optimizer, scheduler and RNG from `path`; return its trainer state.

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
        if _is_fsdp(model):  # saved whole (see _gathered_optimizer_state): each process takes its shard
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
        return artifacts.read_json(path / "trainer_state.json")
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        reason = next((ln.strip() for ln in lines if "mismatch" in ln), lines[0])[:300]  # torch's detail is line 2
        raise LlamaLoraError(
            f"Cannot resume from the checkpoint {path} ({type(e).__name__}: {reason}). It is corrupted or was "
            "made with another model/adapter configuration: run with the model.* and peft.* settings the run "
            "started with, delete this checkpoint to resume from the one before, or start the run over "
            "with overwrite=true."
        ) from e


def _point_adapter_at_base(adapter_dir: Path, name: str, resolved: str) -> None:
    """adapter_config.json names the hub id (portable) or, for the embedded model, its cached path."""
    cfg_path = adapter_dir / "adapter_config.json"
    data = artifacts.read_json(cfg_path)
    data["base_model_name_or_path"] = resolved if name == "embedded" else name
    artifacts.write_json(cfg_path, data)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["train", *sys.argv[1:]])
