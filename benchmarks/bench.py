"""Side-by-side training benchmark: llama-lora vs TRL SFTTrainer vs transformers.Trainer + PEFT.

One process, one command:

    python benchmarks/bench.py                 # ~40M-parameter Llama, LoRA and DoRA (about 10 min on 2 cores)
    python benchmarks/bench.py --quick         # tiny model, a few steps: a smoke test (under a minute)

Every method trains the same steps on the same examples from the same initial weights, in blocks that
alternate between methods:

  (a) llama-lora with its defaults: the step train.py runs (packing + varlen attention, lean LoRA/DoRA,
      fp32 on CPU, AdamW, clipping, loss = mean over the global batch's response tokens)
  (b) TRL SFTTrainer with its defaults (prompt-completion data, bf16, gradient checkpointing, padding
      to the longest example of each batch), given the same model, adapter and batch size
  (c) transformers.Trainer + PEFT, every example padded to max_seq_length (512)
  (d) the floor: the frozen model's forward + backward on llama-lora's batches (no adapter, no optimizer)
  (e) (a) with training.precision=bf16 (opt-in with --methods): CPU's default is fp32; TRL's is bf16
  (f) (a) with peft.lean=false (PEFT's forward; opt-in with --methods), the lean step's baseline
  (g)-(k) more opt-in variants of (a) (--help): auto_batch_size, dropout, (j) peft.lean_merged=false,
      the lean step without merged weights, and (k) peft.lean_kernel=false, the rank-r products by BLAS

For each: non-padding tokens/s (median over the measured steps after warm-up), the ratio to (b), peak
tensor memory of one optimizer step (PyTorch's memory profiler, all tensors alive including weights and
optimizer state), final training loss and effective model-FLOPs utilisation (see `flops_per_token`).
A second part compares the memory planner's prediction with the measured peak for several llama-lora
configurations, and a profile records where a llama-lora step spends its time.

Results: benchmarks/results/bench[-quick].json and .md (the README's table is copied from the .md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

FULL = dict(
    model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=4),
    lengths=(32, 512), median_length=150, examples_per_step=16, micro=4, warmup=1, steps=8,
)
# The reference target's shape (meta-llama/Llama-3.2-1B-Instruct, random weights, saved in bf16 as on
# the hub): for GPUs (--size 1b --device cuda), where the 40M model is too small to fill the device.
LLAMA_1B = dict(
    model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    lengths=(32, 512), median_length=150, examples_per_step=16, micro=4, warmup=2, steps=8, dtype="bfloat16",
)
QUICK = dict(
    model=dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2),
    lengths=(16, 64), median_length=32, examples_per_step=4, micro=2, warmup=1, steps=2,
)
PAD, EOS = 0, 1
DEVICE = "cpu"  # --device: where every method runs


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer and data shared by every method.


def build_model_dir(spec: dict, root: Path, dtype: str = "float32") -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = LlamaConfig(**spec, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=EOS, pad_token_id=PAD)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(root / "model")
    # A word-level tokenizer whose words are the token ids ("w123"), so TRL can tokenize text that
    # maps 1:1 onto the token lists llama-lora trains on.
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2} | {f"w{i}": i for i in range(3, spec["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(root / "model")
    return root / "model"


def make_examples(n: int, spec: dict, seed: int) -> list[dict]:
    """Alpaca-like: log-normal lengths (median ~150 tokens, clipped to 32..512), 30-70% prompt, and a
    response derived from the prompt (reversed) so the loss can fall."""
    rng = random.Random(seed)
    lo, hi = spec["lengths"]
    vocab = spec["model"]["vocab_size"]
    out = []
    while len(out) < n:
        length = int(rng.lognormvariate(math.log(spec["median_length"]), 0.6))
        if not lo <= length <= hi:
            continue
        n_prompt = max(4, int(length * rng.uniform(0.3, 0.7)))
        prompt = [min(vocab - 1, 3 + int(rng.paretovariate(1.1))) if rng.random() < 0.5 else rng.randrange(3, vocab)
                  for _ in range(n_prompt)]
        response = (prompt[::-1] * 8)[: length - n_prompt - 1] + [EOS]
        out.append({"input_ids": prompt + response, "labels": [-100] * n_prompt + response,
                    "prompt": " ".join(f"w{t}" for t in prompt) + " ",
                    "completion": " ".join(f"w{t}" for t in response[:-1])})
    return out


# ----------------------------------------------------------------------------------------------------
# Measurement helpers.


@dataclass
class Result:
    method: str
    adapter: str
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time: robust to a busy machine
    step_tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    notes: str = ""
    micro: int = 0  # examples per forward pass
    block: str = ""  # the adapter block it ran in (the floor runs in each, interleaved with that block's rows)

    def tokens_per_second(self, warmup: int, cpu: bool = False) -> float:
        secs = self.step_cpu_seconds if cpu else self.step_seconds
        rates = [t / s for t, s in zip(self.step_tokens[warmup:], secs[warmup:])]
        return statistics.median(rates) if rates else float("nan")


def matmul_flops(threads: int, n: int = 1536, repeats: int = 6) -> float:
    """Matmul FLOP/s on this machine now (best of a few; the utilisation denominator): fp32 on CPU, and
    on CUDA bf16 (the training precision there) at 8192^3 on random data."""
    dtype = torch.float32
    if DEVICE == "cuda":
        n, dtype = 8192, torch.bfloat16
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    a @ b
    _sync()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_token(model_cfg, adapter_params: int, mean_ctx: float) -> float:
    """Effective model FLOPs per trained token, as the issue defines utilisation:
    4 x frozen matmul params (forward + input gradient) + 6 x adapter params (forward + both gradients)
    + attention (QK^T and PV, causal, forward + backward ~ 3x forward)."""
    h, L, inter, v = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.intermediate_size, model_cfg.vocab_size
    hd = h // model_cfg.num_attention_heads
    q, kv = model_cfg.num_attention_heads * hd, model_cfg.num_key_value_heads * hd
    matmul = L * (h * q + 2 * h * kv + q * h + 3 * h * inter) + v * h  # layers + lm_head
    attention = L * 3 * 2 * 2 * q * mean_ctx / 2
    return 4 * matmul + 6 * adapter_params + attention


def peak_memory(run_one_step, model, optimizer=None) -> int:
    """Peak bytes of all tensors alive during one call (weights, optimizer state, activations...)."""
    from llama_lora.planner import measure_peak_bytes

    return measure_peak_bytes(run_one_step, model, optimizer)


# ----------------------------------------------------------------------------------------------------
# (a) llama-lora and (d) the floor: the step train.py runs, on the same components.


def llama_lora_cfg(model_dir: Path, adapter: str, overrides: dict | None = None):
    from llama_lora.config.schema import Config

    cfg = Config(model={"name_or_path": str(model_dir)}, peft={"method": adapter}, training={"device": DEVICE})
    for key, value in (overrides or {}).items():  # "data.packing": False, ...
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def llama_lora_setup(cfg, frozen: bool = False):
    """Model, params and optimizer exactly as train.py sets them up (no Accelerator: one CPU process)."""
    from llama_lora import data as data_lib, model as model_lib
    from llama_lora.adapter import apply_adapter
    from llama_lora.attention import use_varlen_attention

    from llama_lora.plan import plan_run

    runtime = plan_run(cfg, model_lib.probe_capabilities()).runtime  # train.py's plan, one unsharded process
    model_lib.apply_process_settings(runtime)  # as train.py: process-wide, so (b) and (c) get it too
    torch.manual_seed(cfg.training.seed)
    model = model_lib.load_model(cfg.model.name_or_path, cfg.model, runtime, training=True)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
        # The floor back-propagates as far as adapters on every linear layer need: down to the outputs of
        # layer 0's q/k/v projections (their LoRA B and A need the gradient there, not below it).
        attn = model.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        if cfg.data.packing:
            use_varlen_attention(model)
        model.bench_amp = _amp(runtime)
        return model, [], None, data_lib.make_collate(cfg.data.packing, PAD)
    model = apply_adapter(model, cfg.peft, lean=runtime.lean)
    if cfg.data.packing:
        use_varlen_attention(model)
    model.bench_lean = runtime.lean  # the planner reads the same decision
    params = [p for p in model.parameters() if p.requires_grad]
    tc = cfg.training
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay,
                            betas=(tc.adam_beta1, tc.adam_beta2), fused=runtime.fused_adamw or None)
    model.bench_amp = _amp(runtime)
    return model, params, opt, data_lib.make_collate(cfg.data.packing, PAD)


def _amp(runtime):
    """The autocast train.py runs under (accelerate's mixed precision): None for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.precision)
    return (runtime.device, dtype) if dtype is not None else None


def llama_lora_step(model, params, opt, collate, micro_batches, max_grad_norm: float,
                    scheduler=None) -> tuple[float, int]:
    """One optimizer step as train.py's loop does it; returns (mean response-token loss, tokens)."""
    out: dict = {}
    for _ in llama_lora_step_parts(model, params, opt, collate, micro_batches, max_grad_norm, scheduler, out):
        pass
    return out["loss"], out["tokens"]


def llama_lora_step_parts(model, params, opt, collate, micro_batches, max_grad_norm: float, scheduler, out: dict):
    """llama_lora_step as a generator that pauses after each part (a micro-batch's forward + backward,
    the optimizer), so several variants can interleave at that grain; the last part fills `out`."""
    from llama_lora.data import IGNORE_INDEX
    from llama_lora.loss import response_loss_sum

    count = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for mb in micro_batches for e in mb)
    amp = getattr(model, "bench_amp", None)
    total, tokens = torch.zeros((), device=DEVICE), 0
    for mb in micro_batches:
        batch = {k: v.to(DEVICE) for k, v in collate(mb).items()}
        with torch.autocast(*amp) if amp else contextlib.nullcontext():
            loss_sum, _ = response_loss_sum(model, batch)
            (loss_sum / max(count, 1)).backward()
        total += loss_sum.detach()
        tokens += sum(len(e["input_ids"]) for e in mb)
        yield
    if opt is not None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
    out.update(loss=float(total) / max(count, 1), tokens=tokens)
    yield


LLAMA_LORA_VARIANTS = {  # code -> (row name, frozen, config overrides)
    "a": ("(a) llama-lora", False, {}),
    "d": ("(d) frozen floor", True, {}),
    "e": ("(e) llama-lora, bf16", False, {"training.precision": "bf16"}),
    "f": ("(f) llama-lora, peft.lean=false", False, {"peft.lean": False}),
    # The global batch stays 16 examples; the planner picks the micro-batch (GPU users' one flag).
    "g": ("(g) llama-lora, auto_batch_size", False, {"training.auto_batch_size": True}),
    "h": ("(h) llama-lora, auto_batch_size, peft.lean=false", False,
          {"training.auto_batch_size": True, "peft.lean": False}),
    "i": ("(i) llama-lora, peft.dropout=0.05", False, {"peft.dropout": 0.05}),  # the earlier default
    "j": ("(j) llama-lora, peft.lean_merged=false", False, {"peft.lean_merged": False}),
    "k": ("(k) llama-lora, peft.lean_kernel=false", False, {"peft.lean_kernel": False}),
}


def run_llama_lora(model_dir, adapter, steps, micro, codes) -> list[Result]:
    """The llama-lora variants `codes` side by side: step k of every variant runs before step k+1 of
    any, so a change in machine load hits them alike (the floor and the lean/PEFT ratios need that)."""
    from transformers import get_scheduler

    runs = []
    for code in codes:
        name, frozen, overrides = LLAMA_LORA_VARIANTS[code]
        cfg = llama_lora_cfg(model_dir, adapter, overrides)
        model, params, opt, collate = llama_lora_setup(cfg, frozen)
        model.train()
        tc = cfg.training  # train.py's schedule (warm-up + cosine over the run's steps)
        sched = None if frozen else get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=round(tc.warmup_ratio * len(steps)),
                                                  num_training_steps=len(steps))
        res = Result(name, "-" if frozen else adapter, block=adapter)
        res.micro = micro
        if cfg.training.planner_sizes_batch(DEVICE):  # auto_batch_size, or train.py's default on CUDA
            from llama_lora.planner import auto_batch_size

            res.micro, _, plan = auto_batch_size(cfg, model.get_base_model().config, DEVICE,
                                                 [len(e["input_ids"]) for s in steps for e in s], lean=model.bench_lean)
            res.notes = f"micro-batch {res.micro} (planned peak {plan.total_bytes / 2**30:.1f} GiB)"
        runs.append((res, cfg, model, params, opt, collate, frozen, sched))
    for k, step in enumerate(steps):
        # Interleaved part by part (one micro-batch's forward + backward, or the optimizer): a drift in
        # the machine's speed, which on a shared 2-core VM moves a single step by up to +-10%, then hits
        # every variant's step alike. The order of the variants alternates from step to step.
        order = runs if k % 2 == 0 else runs[::-1]
        live = []  # (result, its step's parts, what the last part fills, [wall, CPU] seconds so far)
        for res, cfg, model, params, opt, collate, frozen, sched in order:
            mbs = [step[i : i + res.micro] for i in range(0, len(step), res.micro)]
            done: dict = {}
            parts = llama_lora_step_parts(model, params, opt, collate, mbs, cfg.training.max_grad_norm, sched, done)
            live.append((res, parts, done, [0.0, 0.0]))
        while live:
            for entry in list(live):
                res, parts, done, spent = entry
                _sync()
                t, c = time.perf_counter(), time.process_time()
                next(parts)
                _sync()
                spent[0] += time.perf_counter() - t
                spent[1] += time.process_time() - c
                if done:
                    live.remove(entry)
                    res.step_seconds.append(spent[0])
                    res.step_cpu_seconds.append(spent[1])
                    res.step_tokens.append(done["tokens"])
                    res.losses.append(done["loss"])
        for res, cfg, model, params, opt, collate, frozen, sched in runs:
            if frozen:
                model.zero_grad(set_to_none=True)
    out = []
    for res, cfg, model, params, opt, collate, frozen, sched in runs:
        last = [steps[-1][i : i + res.micro] for i in range(0, len(steps[-1]), res.micro)]
        res.peak_bytes = peak_memory(
            lambda: llama_lora_step(model, params, opt, collate, last, cfg.training.max_grad_norm), model, opt)
        if frozen:
            model.zero_grad(set_to_none=True)
        out.append(res)
    del runs
    _free()
    return out


# ----------------------------------------------------------------------------------------------------
# (b) TRL and (c) transformers.Trainer: their own loops, timed per optimizer step by a callback.


def _trainer_callback(res: Result, counter: dict, profile_last: bool):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            counter["tokens"] = 0
            if profile_last and state.global_step == args.max_steps - 1:
                counter["profiling"] = True
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            res.step_seconds.append(time.perf_counter() - self.t)
            res.step_cpu_seconds.append(time.process_time() - self.c)
            res.step_tokens.append(counter["tokens"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                res.losses.append(float(logs["loss"]))

    return Timer()


def _count_tokens(model, counter: dict):
    def hook(module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            counter["tokens"] += int(kwargs["attention_mask"].sum())
        elif kwargs.get("position_ids") is not None:
            counter["tokens"] += int(kwargs["position_ids"].numel())
        else:
            counter["tokens"] += int(kwargs["input_ids"].numel())

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def run_trl(model_dir, adapter, steps, micro, out_dir) -> Result:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llama_lora.adapter import lora_config
    from llama_lora.config.schema import PeftConfig

    res = Result("(b) TRL SFTTrainer", adapter)
    examples = [e for step in steps for e in step]
    ds = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    per_step = len(steps[0])
    args = SFTConfig(  # TRL's defaults except what must match: batch, steps, no saving/logging services
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
        max_steps=len(steps), logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=DEVICE == "cpu", seed=0,
    )
    torch.manual_seed(0)
    model = str(model_dir)  # TRL loads it with its own defaults (dtype from the checkpoint's config)
    peft_cfg: LoraConfig = lora_config(PeftConfig(method=adapter))
    counter = {"tokens": 0}
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model_dir),
                         peft_config=peft_cfg, callbacks=[_trainer_callback(res, counter, False)])
    hook = _count_tokens(trainer.model, counter)
    trainer.train()
    res.notes = (f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, lr={args.learning_rate}, "
                 f"dtype {trainer.model.dtype}")
    res.peak_bytes = _trainer_peak(trainer, counter)
    hook.remove()
    del trainer, model
    _free()
    return res


def run_trainer_padded(model_dir, adapter, steps, micro, out_dir, max_len=512) -> Result:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from llama_lora.adapter import lora_config
    from llama_lora.config.schema import PeftConfig

    res = Result("(c) Trainer+PEFT, padded", adapter)
    rows = []
    for step in steps:
        for e in step:
            n = len(e["input_ids"])
            rows.append({"input_ids": e["input_ids"] + [PAD] * (max_len - n), "attention_mask": [1] * n + [0] * (max_len - n),
                         "labels": e["labels"] + [-100] * (max_len - n)})
    per_step = len(steps[0])
    args = TrainingArguments(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=per_step // micro, max_steps=len(steps), logging_steps=1,
                             save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=DEVICE == "cpu", seed=0,
                             learning_rate=2e-4, remove_unused_columns=False, bf16=DEVICE == "cuda")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(PeftConfig(method=adapter)))
    counter = {"tokens": 0}
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator,
                      callbacks=[_trainer_callback(res, counter, False)])
    hook = _count_tokens(trainer.model, counter)
    trainer.train()
    res.notes = f"padded to {max_len}, {'bf16 autocast' if args.bf16 else 'fp32'}, dtype {model.dtype}"
    res.peak_bytes = _trainer_peak(trainer, counter)
    hook.remove()
    del trainer, model
    _free()
    return res


def _trainer_peak(trainer, counter) -> int:
    """Peak memory of one more optimizer step of a Trainer (same micro-batches as a training step)."""
    model, opt = trainer.model_wrapped, trainer.optimizer
    loader = trainer.get_train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == trainer.args.gradient_accumulation_steps:
            break

    def step():
        model.train()
        for b in batches:
            loss = trainer.training_step(model, b, None)
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    return peak_memory(step, model, opt)


# ----------------------------------------------------------------------------------------------------
# Planner vs measured, and the profile of a llama-lora step.


def planner_checks(model_dir, steps, micro) -> list[dict]:
    from transformers import AutoConfig

    from llama_lora.planner import plan_memory

    mc = AutoConfig.from_pretrained(model_dir)
    step = steps[-1]
    configs = [
        ("lora, packed", "lora", {}),
        ("dora, packed", "dora", {}),
        ("lora, padded (no packing)", "lora", {"data.packing": False}),
        ("lora, packed, gradient checkpointing", "lora", {"model.gradient_checkpointing": True}),
    ]
    out = []
    for name, adapter, overrides in configs:
        cfg = llama_lora_cfg(model_dir, adapter, overrides)
        model, params, opt, collate = llama_lora_setup(cfg)
        model.train()
        mbs = [step[i : i + micro] for i in range(0, len(step), micro)]
        llama_lora_step(model, params, opt, collate, mbs, 1.0)  # optimizer state exists from here on
        measured = peak_memory(lambda: llama_lora_step(model, params, opt, collate, mbs, 1.0), model, opt)
        # Plan for the largest micro-batch of the step (the peak is reached in one forward/backward).
        big = max(mbs, key=lambda mb: sum(len(e["input_ids"]) for e in mb) if cfg.data.packing
                  else len(mb) * max(len(e["input_ids"]) for e in mb))
        tokens = sum(len(e["input_ids"]) for e in big) if cfg.data.packing else len(big) * max(len(e["input_ids"]) for e in big)
        loss_tokens = sum(sum(l != -100 for l in e["labels"][1:]) for e in big) if cfg.data.packing else None
        plan = plan_memory(cfg, mc, DEVICE, len(big), tokens_per_micro_batch=tokens,
                           rows_per_micro_batch=1 if cfg.data.packing else len(big),
                           loss_tokens_per_micro_batch=loss_tokens if loss_tokens is not None else _padded_keep(big),
                           lean=model.bench_lean)
        out.append({"config": name, "predicted_bytes": plan.tensor_bytes, "measured_bytes": measured,
                    "error": plan.tensor_bytes / measured - 1, "breakdown": plan.breakdown})
        del model, opt
        _free()
    return out


def _free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _padded_keep(mb) -> int:
    """Logit rows computed for a padded batch: rows x positions where any row has a label."""
    width = max(len(e["input_ids"]) for e in mb)
    keep = set()
    for e in mb:
        keep |= {i for i, label in enumerate(e["labels"][1:]) if label != -100}
    return len(mb) * len(keep & set(range(width)))


def profile_step(model_dir, steps, micro, adapter="lora") -> dict:
    """Where one llama-lora optimizer step spends its time (wall seconds per step, mean of 3 steps).

    The loss over the vocabulary (lm_head on the kept positions + cross-entropy, forward and backward)
    is also timed on its own, on the same shapes, and reported as a part of forward + backward.
    """
    import torch.nn.functional as F

    from llama_lora.loss import response_loss_sum

    cfg = llama_lora_cfg(model_dir, adapter)
    model, params, opt, collate = llama_lora_setup(cfg)
    model.train()
    parts = {"data (collate)": 0.0, "forward": 0.0, "backward": 0.0, "optimizer (clip + AdamW)": 0.0}
    vocab_part = 0.0
    head = model.get_base_model().lm_head.weight
    amp = model.bench_amp
    autocast = (lambda: torch.autocast(*amp)) if amp else contextlib.nullcontext
    for step in steps[:3]:
        for mb in [step[i : i + micro] for i in range(0, len(step), micro)]:
            _sync()
            t0 = time.perf_counter()
            batch = {k: v.to(DEVICE) for k, v in collate(mb).items()}
            _sync()
            t1 = time.perf_counter()
            with autocast():
                loss_sum, n = response_loss_sum(model, batch)
            _sync()
            t2 = time.perf_counter()
            loss_sum.backward()
            _sync()
            t3 = time.perf_counter()
            parts["data (collate)"] += t1 - t0
            parts["forward"] += t2 - t1
            parts["backward"] += t3 - t2
            hidden = torch.randn(n, head.shape[1], requires_grad=True, device=DEVICE)
            targets = torch.randint(0, head.shape[0], (n,), device=DEVICE)
            t4 = time.perf_counter()
            with autocast():
                F.cross_entropy((hidden @ head.t()).float(), targets, reduction="sum").backward()
            _sync()
            vocab_part += time.perf_counter() - t4
        t5 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        parts["optimizer (clip + AdamW)"] += time.perf_counter() - t5
    total = sum(parts.values())
    out = {k: {"seconds": v / 3, "share": v / total} for k, v in parts.items()}
    out["of which: loss over the vocabulary (lm_head + cross-entropy, fwd+bwd)"] = {
        "seconds": vocab_part / 3, "share": vocab_part / total}
    return out


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    ap.add_argument("--size", choices=["40m", "1b"], default="40m",
                    help="40m: the CPU benchmark's model; 1b: Llama-3.2-1B's shape (for a GPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, help="measured optimizer steps per method (after warm-up)")
    ap.add_argument("--adapters", default="lora,dora")
    ap.add_argument("--methods", default="a,b,c,d",
                    help="subset of a,b,c,d; e = (a) with training.precision=bf16; f = (a) with peft.lean=false; "
                         "g = (a) with training.auto_batch_size=true; h = g with peft.lean=false; i = (a) with peft.dropout=0.05; "
                         "j = (a) with peft.lean_merged=false; k = (a) with peft.lean_kernel=false")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--no-planner", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(argv or [])
    load_start = os.getloadavg()[0]

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    spec = QUICK if args.quick else LLAMA_1B if args.size == "1b" else FULL
    steps_n = spec["warmup"] + (args.steps or spec["steps"])
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()

    tmp = Path(tempfile.mkdtemp(prefix="llama-lora-bench-"))
    model_dir = build_model_dir(spec["model"], tmp, spec.get("dtype", "float32"))
    per_step = spec["examples_per_step"]
    examples = make_examples(steps_n * per_step, spec, seed=1)
    steps = [examples[i * per_step : (i + 1) * per_step] for i in range(steps_n)]
    micro = spec["micro"]
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(mc).parameters())
    print(f"model: Llama {n_params / 1e6:.1f}M parameters ({spec['model']}), {steps_n} steps x {per_step} examples "
          f"(micro-batch {micro}), mean length {statistics.mean(len(e['input_ids']) for e in examples):.0f} tokens, "
          f"{args.threads} threads, device {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE == "cuda" else ""), flush=True)

    peaks = [matmul_flops(args.threads)]
    results: list[Result] = []
    methods = args.methods.split(",")
    known = sorted(set("bc") | set(LLAMA_LORA_VARIANTS))  # TRL, Trainer, and llama-lora's variants
    unknown = set(methods) - set(known)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {','.join(known)}")

    def show(r: Result, t0: float) -> None:
        # Partial results survive an interrupted run.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "partial.json").write_text(json.dumps([vars(x) for x in results], indent=1))
        print(f"  {r.method:<32} {r.adapter:<5} {r.tokens_per_second(spec['warmup']):8.0f} tokens/s, "
              f"{r.tokens_per_second(spec['warmup'], cpu=True):8.0f} tokens/CPU-s ({time.perf_counter() - t0:.0f}s)",
              flush=True)

    for i, adapter in enumerate(args.adapters.split(",")):
        # llama-lora's variants interleaved step by step, then TRL and Trainer in blocks; the FLOP/s
        # probe runs between blocks (its median is the utilisation denominator).
        codes = [m for m in methods if m in LLAMA_LORA_VARIANTS]
        t = time.perf_counter()
        for r in run_llama_lora(model_dir, adapter, steps, micro, codes) if codes else []:
            results.append(r)
            show(r, t)
        peaks.append(matmul_flops(args.threads))
        for m in methods:
            if m not in "bc":
                continue
            t = time.perf_counter()
            r = run_trl(model_dir, adapter, steps, micro, tmp) if m == "b" else run_trainer_padded(model_dir, adapter, steps, micro, tmp)
            results.append(r)
            peaks.append(matmul_flops(args.threads))
            show(r, t)

    peak_flops = statistics.median(peaks)
    report = summarise(results, spec, mc, peak_flops, steps, args)
    report["machine"]["load_average_at_start"] = load_start
    if not args.no_planner and "a" in methods:
        report["planner"] = planner_checks(model_dir, steps, micro)
        report["profile"] = profile_step(model_dir, steps, micro)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench-quick" if args.quick else "bench" + ("" if args.size == "40m" else f"-{args.size}") + (
        "" if DEVICE == "cpu" else f"-{DEVICE}")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / "partial.json").unlink(missing_ok=True)
    md = to_markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return report


def _paired(r: Result, floor: Result | None, warmup: int) -> list[float]:
    """r's step time over the floor's, step by step (same examples, measured back to back)."""
    if floor is None or not r.block or r.step_tokens != floor.step_tokens:
        return []
    return [a / f for a, f in zip(r.step_seconds[warmup:], floor.step_seconds[warmup:])]


def summarise(results, spec, mc, peak_flops, steps, args) -> dict:
    from llama_lora.planner import _model_shapes, _targets  # adapter size by the planner's own count

    lengths = [len(e["input_ids"]) for step in steps for e in step]
    mean_ctx = sum(n * n for n in lengths) / sum(lengths)  # token-weighted example length
    rows = []
    trl = {r.adapter: r.tokens_per_second(spec["warmup"]) for r in results if r.method.startswith("(b)")}
    trl_cpu = {r.adapter: r.tokens_per_second(spec["warmup"], cpu=True) for r in results if r.method.startswith("(b)")}
    for r in results:
        tps = r.tokens_per_second(spec["warmup"])
        tps_cpu = r.tokens_per_second(spec["warmup"], cpu=True)
        adapter_params = 0
        if r.adapter != "-":
            from llama_lora.config.schema import Config

            cfg = Config(peft={"method": r.adapter})
            _, linears = _model_shapes(type(mc), mc.to_json_string(use_diff=False))
            adapter_params = sum(cfg.peft.r * (m.in_features + m.out_features) + (m.out_features if r.adapter == "dora" else 0)
                                 for m in _targets(cfg, linears))
        ref = trl.get(r.adapter) or trl.get("lora")
        floor = next((x for x in results if x.method.startswith("(d)") and x.block == r.block), None)
        rows.append({
            "block": r.block,
            # step time over the frozen floor's on the same step, run right after it (interleaved in the
            # same block): the median of these paired ratios, robust to the machine's load drifting
            "step_vs_floor": statistics.median(pairs) if (pairs := _paired(r, floor, spec["warmup"])) else None,
            "step_vs_floor_pairs": pairs,
            "method": r.method, "adapter": r.adapter, "tokens_per_second": tps,
            "ratio_to_trl": tps / ref if ref else None,
            "tokens_per_cpu_second": tps_cpu,
            "cpu_ratio_to_trl": tps_cpu / (trl_cpu.get(r.adapter) or trl_cpu.get("lora")) if trl_cpu else None,
            "peak_memory_mb": r.peak_bytes / 2**20 if r.peak_bytes else None,
            "final_loss": r.losses[-1] if r.losses else None,
            "effective_mfu": flops_per_token(mc, adapter_params, mean_ctx) * tps / peak_flops,
            "step_seconds": r.step_seconds, "step_cpu_seconds": r.step_cpu_seconds, "step_tokens": r.step_tokens,
            "losses": r.losses, "notes": r.notes,
        })
    return {
        "command": " ".join(["python benchmarks/bench.py", *args.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "load_average_at_end": os.getloadavg(), "torch": torch.__version__, "device": DEVICE,
                    "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None},
        "matmul_dtype": "bf16" if DEVICE == "cuda" else "fp32",
        "fp32_matmul_gflops": peak_flops / 1e9, "warmup_steps": spec["warmup"],
        "measured_steps": len(steps) - spec["warmup"], "examples_per_step": len(steps[0]), "micro_batch": spec["micro"],
        "rows": rows,
    }


def _times(ratio) -> str:
    return "-" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x"  # "-": no TRL row to compare with


def to_markdown(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}`; {report['machine'].get('gpu') or str(report['machine']['threads']) + ' threads'}, "
        f"{report.get('matmul_dtype', 'fp32')} matmul {report['fp32_matmul_gflops']:.0f} GFLOP/s, load average {report['machine'].get('load_average_at_start', 0):.1f} at start, "
        f"{report['machine']['load_average_at_end'][0]:.1f} at end; "
        f"{report['measured_steps']} measured steps (median) after {report['warmup_steps']} warm-up, "
        f"{report['examples_per_step']} examples per step (micro-batch {report['micro_batch']}).",
        "",
        "| method | adapter | non-padding tokens/s | vs TRL | tokens/CPU-s | vs TRL (CPU) | step vs floor "
        "| peak memory (MiB) | final loss | effective MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['adapter'] if r['adapter'] != '-' else '- (%s block)' % r['block']} | "
            f"{r['tokens_per_second']:.0f} | "
            f"{_times(r['ratio_to_trl'])} | {r['tokens_per_cpu_second']:.0f} | {_times(r['cpu_ratio_to_trl'])} | "
            f"{'%.3fx' % r['step_vs_floor'] if r.get('step_vs_floor') else '-'} | {r['peak_memory_mb'] or float('nan'):.0f} | "
            f"{r['final_loss'] if r['final_loss'] is not None else float('nan'):.3f} | {r['effective_mfu']:.2f} |"
        )
    notes = [f"- {r['method']} ({r['adapter']}): {r['notes']}" for r in report["rows"] if r.get("notes")]
    if notes:
        lines += ["", *notes]
    if report.get("planner"):
        lines += ["", "| llama-lora configuration | planner (MiB) | measured (MiB) | error |", "|---|---:|---:|---:|"]
        for p in report["planner"]:
            lines.append(f"| {p['config']} | {p['predicted_bytes'] / 2**20:.0f} | {p['measured_bytes'] / 2**20:.0f} | "
                         f"{100 * p['error']:+.1f}% |")
    if report.get("profile"):
        lines += ["", "| llama-lora step part | seconds | share |", "|---|---:|---:|"]
        for k, v in report["profile"].items():
            lines.append(f"| {k} | {v['seconds']:.3f} | {100 * v['share']:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
