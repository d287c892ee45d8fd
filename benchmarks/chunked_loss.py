"""Chunked loss (issue 15): peak memory and step time of one training micro-batch with and without
training.loss_chunk_size, on a large-vocabulary tiny Llama (CPU), and the planner's figure beside each.

    python benchmarks/chunked_loss.py                      # vocab 128256, hidden 256, 2 layers, 4 x 512
    python benchmarks/chunked_loss.py --chunks 0,256,1024 --reps 2

Peak: all tensors alive during one forward + backward + AdamW step (planner.measure_peak_bytes: the
profiler's allocations, CPU). Time: the median of --reps steps, outside the profiler. The planner's
figure is plan_memory's tensor total for the same batch. The micro-batch is packed (4 examples of 512
tokens in one row); the first 64 tokens of each example are prompt, the rest response (1,792 positions
through the loss).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora import lean
from llama_lora.adapter import apply_adapter
from llama_lora.attention import use_varlen_attention
from llama_lora.config.schema import Config
from llama_lora.data import IGNORE_INDEX, collate_packed
from llama_lora.loss import response_loss_sum
from llama_lora.planner import measure_peak_bytes, plan_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--chunks", default="0,128,256,512,1024,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: bf16 autocast over fp32 weights (training.precision=bf16 on CPU)")
    args = ap.parse_args()

    mc = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                     num_key_value_heads=max(args.hidden // 128, 1), max_position_embeddings=args.seq,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    # The base in the dtype train.py loads it in (bf16 under training.precision=bf16), fp32 adapters.
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(mc, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    cfg = Config.model_validate({"model": {"name_or_path": "x"}, "data": {"max_seq_length": args.seq},
                                 "training": {"precision": args.precision}})
    policy = lean.decide(cfg.peft, "cpu", args.precision)
    model = apply_adapter(model, cfg.peft, lean=policy)
    use_varlen_attention(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch):
        ids = torch.randint(1, args.vocab, (args.seq,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * args.prompt + ids[args.prompt :]})
    batch = collate_packed(examples)
    response = args.batch * (args.seq - args.prompt)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; vocab {args.vocab:,}, hidden "
          f"{args.hidden}, {args.layers} layers, {args.batch} x {args.seq} packed, {response:,} response "
          f"positions, {args.precision}; full fp32 logits {response * args.vocab * 4 / 2**20:,.0f} MiB; "
          f"{policy.describe()}")

    def step(chunk: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss, n = response_loss_sum(model, batch, chunk)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step(0)  # optimizer state and gradients exist from here on, as between real steps
    print("| loss_chunk_size | peak (MiB) | planned (MiB) | step (s) |")
    print("|---|---:|---:|---:|")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        step(chunk)  # warm-up
        peak = measure_peak_bytes(lambda: step(chunk), model, opt)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step(chunk)
            times.append(time.perf_counter() - t0)
        plan_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"loss_chunk_size": chunk})})
        plan = plan_memory(plan_cfg, mc, "cpu", args.batch, tokens_per_micro_batch=args.batch * args.seq,
                           rows_per_micro_batch=1, loss_tokens_per_micro_batch=response, lean=policy)
        label = "0 (unchunked)" if chunk == 0 else str(chunk)
        print(f"| {label} | {peak / 2**20:,.0f} | {plan.tensor_bytes / 2**20:,.0f} | "
              f"{statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
