"""Memory benchmark on Llama-3.2-1B's real shape (issue 15): quantized bases, gradient checkpointing and
the chunked loss, measured peak memory and tokens/s beside the planner's figure.

    python benchmarks/memory.py                       # every row, 16 layers (needs ~20 GiB free RAM)
    python benchmarks/memory.py --layers 2 --steps 2  # what fits a shared 2-core machine
    python benchmarks/memory.py --rows lora-fp32,qlora-nf4 --layers 2

The model is meta-llama/Llama-3.2-1B-Instruct's hub config (hidden 2048, 32/8 heads, intermediate 8192,
vocabulary 128,256, tied embeddings) with random weights, built and saved locally in bf16 (as on the hub);
--layers keeps every dimension but the depth. Each row trains `--steps` optimizer steps of one packed
micro-batch of 4 x 512 tokens (the last 384 of each example are the response) through llama-lora's own
pieces (model.load_model with its quantization and k-bit preparation, adapter.apply_adapter with the
run's lean policy, loss.response_loss_sum with training.loss_chunk_size, AdamW), each row in its own
subprocess so that one row's memory never counts in another's. Measured per row: the peak RSS during the
training steps (sampled every 5 ms from /proc/self/statm), the process's peak RSS (getrusage, including
loading), and tokens/s over the steps after the first; the planner's total (planner.plan_memory) beside
the measured peak; ratios to the LoRA fp32 row of the same invocation.

Results: benchmarks/results/memory.json and memory.md (the table in benchmarks/README.md is copied from it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30

# meta-llama/Llama-3.2-1B-Instruct config.json (the fields that shape memory)
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                    eos_token_id=128009)
MICRO, SEQ, PROMPT = 4, 512, 128

# name -> overrides (model.quantization, peft.method, training.precision, checkpointing, loss chunk)
ROWS: dict[str, dict] = {}
for base, q, method, prec in (("lora-fp32", "none", "lora", "fp32"), ("lora-bf16", "none", "lora", "bf16"),
                              ("qlora-nf4", "nf4", "lora", "fp32"), ("int8", "int8", "lora", "fp32"),
                              ("dora-nf4", "nf4", "dora", "fp32")):
    for gc in (False, True):
        for chunk in (0, 512):
            name = base + ("+gc" if gc else "") + ("+chunk" if chunk else "")
            ROWS[name] = dict(quantization=q, method=method, precision=prec, gc=gc, chunk=chunk)
DEFAULT_ROWS = ["lora-fp32", "lora-fp32+chunk", "lora-fp32+gc", "lora-bf16", "lora-bf16+gc", "qlora-nf4",
                "qlora-nf4+chunk", "qlora-nf4+gc", "qlora-nf4+gc+chunk", "int8", "int8+gc", "dora-nf4",
                "dora-nf4+gc"]


def build_model(layers: int, root: Path) -> Path:
    """The reference shape with random weights, saved once per depth (bf16 safetensors + a tokenizer-free
    config; the benchmark feeds token ids directly)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = root / f"llama-3.2-1b-shape-{layers}l"
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA_3_2_1B, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


class _PeakRss:
    """Peak resident memory of this process while active, sampled from /proc/self/statm."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self.peak_anon, self._stop = every, 0, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        """Resident bytes; also tracks the anonymous part (resident minus file-backed/shared pages, e.g.
        an mmapped safetensors file), what the process itself allocated."""
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]) * self._page, int(fields[2]) * self._page
        self.peak_anon = max(self.peak_anon, resident - shared)
        return resident

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _setup(name: str, model_dir: Path):
    """The row's config and runtime (lean policy decided as train.py does), the batch and the plan."""
    from transformers import AutoConfig

    from llama_lora import model as model_lib
    from llama_lora.config.load import load_config
    from llama_lora.data import IGNORE_INDEX, collate_packed
    from llama_lora.plan import plan_run
    from llama_lora.planner import plan_memory

    import torch

    row = ROWS[name]
    cfg = load_config([f"model.name_or_path={model_dir}", f"model.quantization={row['quantization']}",
                       f"peft.method={row['method']}", f"training.precision={row['precision']}",
                       f"model.gradient_checkpointing={str(row['gc']).lower()}",
                       f"training.loss_chunk_size={row['chunk']}", "training.device=cpu",
                       f"training.micro_batch_size={MICRO}", f"data.max_seq_length={SEQ}", "data.packing=true"])
    run_plan = plan_run(cfg, model_lib.probe_capabilities())  # train.py's plan, one unsharded process
    runtime = run_plan.runtime
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(MICRO):
        ids = torch.randint(0, LLAMA_3_2_1B["vocab_size"], (SEQ,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * PROMPT + ids[PROMPT:]})
    batch = collate_packed(examples)
    response = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    plan = plan_memory(cfg, AutoConfig.from_pretrained(model_dir), run_plan, MICRO, tokens_per_micro_batch=MICRO * SEQ,
                       rows_per_micro_batch=1, loss_tokens_per_micro_batch=response)
    return cfg, runtime, batch, plan


def run_row(name: str, model_dir: Path, steps: int) -> dict:
    """One row, in this process: load, adapt, train `steps` steps, measure."""
    import torch
    from transformers import AutoConfig

    from llama_lora import model as model_lib
    from llama_lora.adapter import apply_adapter
    from llama_lora.attention import use_varlen_attention
    from llama_lora.loss import response_loss_sum

    row = ROWS[name]
    cfg, runtime, batch, plan = _setup(name, model_dir)
    model_lib.apply_process_settings(runtime)
    torch.manual_seed(0)
    model = model_lib.load_model(str(model_dir), cfg.model, runtime, training=True)
    model = apply_adapter(model, cfg.peft, lean=runtime.lean)
    use_varlen_attention(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=runtime.precision == "bf16")
    with _PeakRss() as rss:
        for _ in range(steps):
            t0 = time.perf_counter()
            with autocast:
                loss, n = response_loss_sum(model, batch, row["chunk"])
                (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss) / n)
    timed = times[1:] or times
    return {
        "row": name, **row, "layers": AutoConfig.from_pretrained(model_dir).num_hidden_layers, "steps": steps,
        "tokens_per_step": MICRO * SEQ, "step_s": sum(timed) / len(timed), "first_step_s": times[0],
        "tokens_per_s": MICRO * SEQ / (sum(timed) / len(timed)), "loss": losses,
        "peak_rss_train_gib": rss.peak / GiB, "peak_anon_train_gib": rss.peak_anon / GiB,
        "peak_rss_process_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "planned_gib": plan.total_bytes / GiB, "plan": {k: v / GiB for k, v in plan.breakdown.items()},
        "training_step": runtime.lean.describe(), "malloc": runtime.malloc,
    }


def table(results: list[dict]) -> str:
    ref = next((r for r in results if r["row"] == "lora-fp32" and "error" not in r), None)
    lines = ["| row | base | method | precision | grad ckpt | chunked loss | peak RSS (train) GiB | planned GiB | "
             "planned / measured | peak vs LoRA fp32 | tokens/s | step time vs LoRA fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} |||||||||||")
            continue
        ratio = f"{r['peak_rss_train_gib'] / ref['peak_rss_train_gib']:.2f}x" if ref else "-"
        speed = f"{r['step_s'] / ref['step_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['row']} | {r['quantization']} | {r['method']} | {r['precision']} | {'on' if r['gc'] else 'off'} | "
            f"{r['chunk'] or 'off'} | {r['peak_rss_train_gib']:.2f} | {r['planned_gib']:.2f} | "
            f"{r['planned_gib'] / r['peak_rss_train_gib']:.2f} | {ratio} | {r['tokens_per_s']:.0f} | {speed} |")
    return "\n".join(lines)


def plan_table(model_dir: Path, names: list[str]) -> str:
    """The planner's figure and its parts for every row, without training (seconds, any machine)."""
    parts = ["weights", "quant stats", "merged weights", "activations", "logits/loss", "overhead"]
    lines = ["| row | planned GiB | " + " | ".join(parts) + " |", "|---|---:|" + "---:|" * len(parts)]
    for name in names:
        plan = _setup(name, model_dir)[3]
        b = plan.breakdown
        lines.append(f"| {name} | {plan.total_bytes / GiB:.2f} | "
                     + " | ".join(f"{b.get(k, 0) / GiB:.2f}" for k in parts) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 = the real depth)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per row (tokens/s over all but the first)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--cache", default=os.environ.get("LLAMA_LORA_BENCH_CACHE", "/tmp/llama-lora-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "memory"))
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    ap.add_argument("--plan-only", action="store_true", help="print the planner's table for --rows; train nothing")
    args = ap.parse_args()
    if args.row:
        import warnings

        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(run_row(args.row, Path(args.model), args.steps)), flush=True)
        return
    model_dir = build_model(args.layers, Path(args.cache))
    if args.plan_only:
        print(plan_table(model_dir, args.rows.split(",")))
        return
    results = []
    for name in args.rows.split(","):
        cmd = [sys.executable, __file__, "--row", name, "--model", str(model_dir), "--steps", str(args.steps)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"row": name, "error": proc.stderr.strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            res = {"row": name, "error": f"timed out after {args.timeout}s"}
        if isinstance(res.get("error"), list):
            res["error"] = " ".join(res["error"])
        results.append(res)
        print(f"{name}: {json.dumps(res)[:400]} ({time.time() - t0:.0f}s)", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": args.layers, "steps": args.steps, "micro_batch": MICRO, "seq": SEQ,
                "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]), "cpus": os.cpu_count()}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        out.with_suffix(".md").write_text(f"`{meta['command']}` ({args.layers} layers, {args.steps} steps, "
                                          f"micro-batch {MICRO} x {SEQ}, {os.cpu_count()} CPUs)\n\n"
                                          + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
