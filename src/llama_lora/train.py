"""`llama-lora train`: run(cfg) -> run directory. Setup, then the loop, then the saves, top to bottom.

The loop is written out (no Trainer) so that every step is visible: deterministic data order that a
resume can reproduce exactly, loss normalised over the response tokens of the whole global batch,
padding-free packing, signals and non-finite guards. accelerate supplies device placement, mixed
precision and DDP, so `accelerate launch` / `torchrun` work unchanged.
"""

from __future__ import annotations

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
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
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
from llama_lora.evaluate import evaluate_loss, response_loss_sum

log = logging.getLogger("llama_lora.train")


def run(cfg: Config) -> Path:
    t_start = time.time()
    tc = cfg.training
    caps = model_lib.probe_capabilities()
    runtime = model_lib.choose_runtime(tc, cfg.model, caps)
    accelerator = Accelerator(
        cpu=runtime.device == "cpu",
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[runtime.precision],
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    main = accelerator.is_main_process
    world = accelerator.num_processes

    # ---- run directory: new, resumed, or refused (a finished run is never silently overwritten)
    run_dir = _prepare_run_dir(cfg, accelerator)
    if main:
        _add_file_log(run_dir.log)
    log.info("Run directory %s", run_dir.path)
    log.info("Runtime: %s", runtime.reason)
    if runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- model, tokenizer, adapter (seeded so the adapter init is reproducible)
    _seed_everything(tc.seed)
    base_path = model_lib.resolve_model_path(cfg.model.name_or_path)
    tokenizer = model_lib.load_tokenizer(base_path, cfg.model)
    model = model_lib.load_model(base_path, cfg.model, runtime, training=True)
    model = apply_adapter(model, cfg.peft)
    trainable, total = count_parameters(model)

    # ---- data: format, tokenize, mask
    fmt = data_lib.PromptFormat.choose(cfg.data, tokenizer)
    train_ds, eval_ds = data_lib.load_train_eval(cfg.data, tc.seed)
    train_examples, train_stats = data_lib.tokenize_dataset(train_ds, cfg.data, tokenizer, fmt, "train")
    eval_examples, eval_stats = data_lib.tokenize_dataset(eval_ds, cfg.data, tokenizer, fmt, "eval")
    eval_examples = eval_examples[: cfg.data.max_eval_examples]
    collate = data_lib.make_collate(cfg.data.packing, tokenizer.pad_token_id)

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
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    # ---- resume from the newest complete checkpoint of this run
    state = {"step": 0, "tokens": 0, "response_tokens": 0, "train_time": 0.0, "eval_loss_before": None}
    checkpoints = run_dir.checkpoint_dirs()
    if checkpoints and tc.resume == "auto":
        state = _load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler, device)
        log.info("Resumed from %s (step %d of %d)", checkpoints[-1], state["step"], total_steps)

    if main:
        artifacts.write_text(run_dir.config, to_yaml(cfg))
        artifacts.write_json(run_dir.prompt, fmt.to_dict())
        run_dir.set_status("running", base_model=base_path, base_model_id=cfg.model.name_or_path,
                           pid=os.getpid(), total_steps=total_steps)
    trackers = _Trackers(cfg, run_dir, purge_step=state["step"] or None) if main else None
    log.info(
        "Training %d steps: %d examples, global batch %d (%d x %d accumulation x %d processes), packing=%s, "
        "%s trainable of %s parameters", total_steps, len(train_examples), global_batch, tc.micro_batch_size,
        tc.gradient_accumulation_steps, world, cfg.data.packing, f"{trainable:,}", f"{total:,}",
    )

    def evaluate() -> float:
        with accelerator.autocast():
            return evaluate_loss(model, eval_examples, collate, cfg.eval.batch_size, device)["loss"]

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
    window_loss, window_tokens, eval_loss = 0.0, 0, None
    last_ckpt = str(checkpoints[-1]) if checkpoints and tc.resume == "auto" else None
    while state["step"] < total_steps:
        step = state["step"] + 1
        t0 = time.time()
        micro_batches = _step_batches(train_examples, step, steps_per_epoch, tc, accelerator, tc.seed)
        counts = torch.tensor([sum(sum(l != data_lib.IGNORE_INDEX for l in e["labels"][1:]) for e in mb)
                               for mb in micro_batches], device=device).sum()
        # Normalise by the response tokens of the *global* batch: every token weighs the same whatever
        # the micro-batch or process it landed in (DDP averages gradients, hence the x world).
        global_count = accelerator.reduce(counts, reduction="sum").item()
        step_loss = 0.0
        for i, mb in enumerate(micro_batches):
            batch = {k: v.to(device, non_blocking=runtime.pin_memory) for k, v in collate(mb).items()}
            last = i == len(micro_batches) - 1
            with accelerator.no_sync(model) if not last else _nullcontext(), accelerator.autocast():
                loss_sum, _ = response_loss_sum(model, batch)
                if tc.debug_nan_at_step == step:
                    loss_sum = loss_sum * float("nan")
                loss = loss_sum * world / max(global_count, 1)
                accelerator.backward(loss)
            step_loss += float(loss_sum.detach())
            state["tokens"] += int(batch["input_ids"].numel() if cfg.data.packing else batch["attention_mask"].sum())
        step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="sum").item() / max(global_count, 1)
        if not math.isfinite(step_loss):
            if main:
                run_dir.set_status("failed", error=f"non-finite loss at step {step}")
            raise LlamaLoraError(
                f"The training loss became {step_loss} at step {step}; stopped without saving. "
                f"Last good checkpoint: {last_ckpt or 'none'}. Lower training.learning_rate, check the data, "
                "or use training.precision=fp32 / bf16 instead of fp16."
            )
        if tc.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["response_tokens"] += int(global_count)
        state["train_time"] += time.time() - t0
        window_loss += step_loss
        window_tokens += 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        if step % tc.log_every == 0 or step == total_steps:
            state["train_loss"] = window_loss / window_tokens
            tps = state["tokens"] * world / max(state["train_time"], 1e-9)
            if trackers:
                trackers.log({"train/loss": state["train_loss"], "train/lr": scheduler.get_last_lr()[0],
                              "train/tokens_per_second": tps}, step)
            log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, total_steps, state["train_loss"],
                     scheduler.get_last_lr()[0], tps)
            window_loss, window_tokens = 0.0, 0
        if (tc.eval_every and step % tc.eval_every == 0) or step == total_steps:
            eval_loss = evaluate()
            state["eval_loss"] = eval_loss
            log.info("step %d eval loss %.4f", step, eval_loss)
            if trackers:
                trackers.log({"eval/loss": eval_loss}, step)
        if (tc.save_every and step % tc.save_every == 0 and step < total_steps) or stop.requested:
            last_ckpt = _save_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, tc.keep_checkpoints)
        if stop.requested:
            progress.close()
            if main:
                run_dir.set_status("interrupted", step=step, checkpoint=last_ckpt)
                trackers.close()
            log.warning("Stopped by %s at step %d; checkpoint saved to %s. Run the same command again to resume.",
                        stop.signal_name, step, last_ckpt)
            raise SystemExit(128 + stop.signum)
    progress.close()
    stop.restore()

    # ---- final saves: adapter (plain PEFT format), tokenizer, metrics
    if main:
        unwrapped = accelerator.unwrap_model(model)
        artifacts.check_free_space(run_dir.path, 2 * trainable * 4 + 50 * 2**20)
        with artifacts.atomic_dir(run_dir.adapter) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            _point_adapter_at_base(tmp, cfg.model.name_or_path, base_path)
        with artifacts.atomic_dir(run_dir.tokenizer) as tmp:
            tokenizer.save_pretrained(tmp)
        metrics = {
            "train_loss": state.get("train_loss"),
            "eval_loss_before": state["eval_loss_before"],
            "eval_loss": state.get("eval_loss"),
            "eval_perplexity": math.exp(min(state["eval_loss"], 50)) if state.get("eval_loss") is not None else None,
            "steps": state["step"],
            "tokens_seen": state["tokens"] * world,
            "response_tokens_seen": state["response_tokens"],
            "tokens_per_second": state["tokens"] * world / max(state["train_time"], 1e-9),
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
        # Checkpoints exist for resuming; a finished run keeps only its adapter.
        shutil.rmtree(run_dir.checkpoints, ignore_errors=True)
        run_dir.set_status(artifacts.FINISHED, step=state["step"])
        trackers.close()
        log.info("Finished in %.0fs: eval loss %.4f -> %.4f; adapter in %s", metrics["wall_time_s"],
                 metrics["eval_loss_before"], metrics["eval_loss"], run_dir.adapter)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir.path


# ----------------------------------------------------------------------------------------------------
# Helpers of the flow above, in the order they are used.


def _prepare_run_dir(cfg: Config, accelerator: Accelerator) -> RunDir:
    name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = RunDir(Path(cfg.output_dir) / name)
    if accelerator.is_main_process:
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
    accelerator.wait_for_everyone()
    return run_dir


def _add_file_log(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("llama_lora").addHandler(handler)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _step_batches(examples, step, steps_per_epoch, tc, accelerator, seed):
    """This process's micro-batches for optimizer step `step` (1-based).

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted run would have, without saving any data-loader state.
    """
    epoch, index = divmod(step - 1, steps_per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    world, rank, micro = accelerator.num_processes, accelerator.process_index, tc.micro_batch_size
    start = index * micro * tc.gradient_accumulation_steps * world
    batches = []
    for k in range(tc.gradient_accumulation_steps):
        lo = start + (k * world + rank) * micro
        batches.append([examples[j] for j in order[lo : lo + micro]])
    return batches


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

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _save_checkpoint(run_dir, accelerator, model, optimizer, scheduler, state, keep) -> str | None:
    path = run_dir.checkpoints / f"step-{state['step']:06d}"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        artifacts.check_free_space(run_dir.path, 4 * sum(p.numel() * 4 for p in optimizer.param_groups[0]["params"]) + 2**20)
        with artifacts.atomic_dir(path) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            artifacts.write_json(tmp / "trainer_state.json", state)  # written last: marks completeness
        for old in run_dir.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return str(path)


def _load_checkpoint(path: Path, model, optimizer, scheduler, device) -> dict:
    # weights_only=True: a checkpoint can never execute code when loaded.
    adapter = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(model, adapter)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return artifacts.read_json(path / "trainer_state.json")


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
