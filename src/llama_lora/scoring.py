"""Score a model on the held-out split: loss, perplexity, exact match per task family, sample answers.

What eval and baseline report, and how two results are compared: `settings` is everything that changes
the numbers, and the side-by-side table. Loss uses the training pipeline (formatting, masking,
collation and the loss function of training).
"""

from __future__ import annotations

import contextlib

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llama_lora import artifacts, data as data_lib
from llama_lora.config.schema import EMBEDDED, Config
from llama_lora.data import make_collate, tokenize_dataset
from llama_lora.generation import generate_batched, generation_config
from llama_lora.loss import response_loss_sum


def held_out_split(cfg: Config):
    """The held-out split eval and baseline share, capped at data.max_eval_examples rows."""
    ds = data_lib.load_test(cfg.data, cfg.training.seed)
    return ds.select(range(min(len(ds), cfg.data.max_eval_examples)))


def settings(cfg: Config, base_model: str, fmt) -> dict:
    """Everything that changes the numbers: two results are comparable only if these are equal.

    Paths and ids name what was scored, the fingerprints say which contents: a base model saved again at
    the same path, or an edited test file, makes a cached result stale.
    """
    d = cfg.data
    return {
        "base_model": base_model,
        "base_model_fingerprint": model_fingerprint(base_model, cfg.model.revision),
        "data": {"source": d.source, "fingerprint": data_fingerprint(d.source),
                 "test_split": d.test_split, "eval_split": d.eval_split,
                 "eval_fraction": d.eval_fraction, "seed": cfg.training.seed, "columns": d.columns.model_dump(),
                 "max_eval_examples": d.max_eval_examples, "max_seq_length": d.max_seq_length},
        "prompt": fmt.to_dict(),
        "max_new_tokens": cfg.eval.max_new_tokens,
    }


def model_fingerprint(base_model: str, revision: str | None = None) -> str:
    """Which weights `base_model` (a resolved local path or a hub id) holds: its files' fingerprint; for a hub
    id the snapshot in the local hub cache (named by its commit) if there is one, else the id and revision."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return artifacts.fingerprint(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: fall back to the name
        cached = None
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        return f"{base_model}@{snapshot.name}: {artifacts.fingerprint(snapshot)}"
    return f"{base_model}@{revision or 'default'}"


def data_fingerprint(source: str) -> str:
    """Which contents the data source holds: a local file's or folder's fingerprint; the embedded data is
    built by this project into a folder named by its recipe version; a hub id stands for itself."""
    if source == EMBEDDED:
        from llama_lora.embedded import DATASET_DIRNAME

        return DATASET_DIRNAME
    path = Path(source).expanduser()
    return artifacts.fingerprint(path) if path.exists() else source


@torch.no_grad()
def loss_sums(model: torch.nn.Module, examples: list[dict], collate, batch_size: int, device,
              loss_chunk_size: int | None = None, *, rank: int = 0, world: int = 1,
              autocast=contextlib.nullcontext) -> tuple[float, int]:
    """(summed response-token loss, response tokens) over `examples`, in eval mode: the one eval-loss loop
    (train's evaluation and eval's both run it). `loss_chunk_size`: training.loss_chunk_size, or the
    resolved chunk (the same value either way). With `world` > 1 this process scores every world-th
    batch; every process runs the same number of forward passes (a spare one repeats batch 0 and is not
    counted), since under FSDP a forward is a collective and a process that stopped early would hang
    the rest. Summing across processes is the caller's."""
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast():
        for j in range(rank, math.ceil(len(batches) / world) * world, world):
            batch = {k: v.to(device) for k, v in collate(batches[j if j < len(batches) else 0]).items()}
            loss, n = response_loss_sum(model, batch, loss_chunk_size)
            if j < len(batches):
                total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count


def evaluate_loss(model: torch.nn.Module, examples: list[dict], collate, batch_size: int, device,
                  loss_chunk_size: int | None = None) -> dict[str, float]:
    """Mean response-token loss and perplexity over `examples` (`loss_chunk_size`: training.loss_chunk_size,
    as in training: the same value either way, the vocabulary-sized logits chunked or not)."""
    total, count = loss_sums(model, examples, collate, batch_size, device, loss_chunk_size)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def exact_match_scores(predictions: list[str], references: list[str], tasks: list[str]) -> dict:
    """Share of exact (whitespace-trimmed) matches, per task family and overall."""
    by_task: dict[str, list[int]] = {}
    for p, r, t in zip(predictions, references, tasks):
        hit = by_task.setdefault(t, [0, 0])
        hit[0] += int(exact_match(p, r))
        hit[1] += 1
    correct, total = sum(c for c, _ in by_task.values()), sum(n for _, n in by_task.values())
    return {
        "overall": correct / max(total, 1),
        "by_task": {t: c / n for t, (c, n) in sorted(by_task.items())},
        "counts": {t: n for t, (_, n) in sorted(by_task.items())},
    }


@torch.no_grad()
def evaluate_split(model, tokenizer, fmt, ds, cfg, device) -> dict:
    """Everything eval/baseline report for one model on one (already capped) split.

    Loss uses the training pipeline (same formatting, masking and collation); exact match is computed
    only when rows carry a `task` column (the embedded data's checkable families), by greedy
    generation in left-padded batches.
    """
    examples, _ = tokenize_dataset(ds, cfg.data, tokenizer, fmt, "test")
    result = evaluate_loss(model, examples, make_collate(cfg.data.packing, tokenizer.pad_token_id),
                           cfg.eval.batch_size, device, cfg.training.loss_chunk_size)
    result["examples"] = len(examples)
    cols = cfg.data.columns
    rows = [r for r in ds if data_lib.field_text(r.get(cols.instruction), cols.instruction).strip()
            and data_lib.field_text(r.get(cols.output), cols.output).strip()]
    checkable = "task" in ds.column_names
    gen_rows = rows if checkable else rows[: cfg.eval.num_samples]
    prompts = [fmt.prompt(tokenizer, data_lib.field_text(r[cols.instruction], cols.instruction).strip(),
                          data_lib.field_text(r.get(cols.input), cols.input).strip())
               for r in gen_rows]
    gen = generation_config(model, tokenizer, cfg.eval.max_new_tokens)
    predictions = [p.strip() for p in generate_batched(model, tokenizer, prompts, gen, cfg.eval.batch_size)]
    references = [data_lib.field_text(r[cols.output], cols.output).strip() for r in gen_rows]
    result["exact_match"] = (
        exact_match_scores(predictions, references, [data_lib.field_text(r["task"], "task") for r in gen_rows])
        if checkable else None
    )
    result["samples"] = [
        {"instruction": data_lib.field_text(r[cols.instruction], cols.instruction).strip(),
         "input": data_lib.field_text(r.get(cols.input), cols.input).strip(),
         "reference": ref, "prediction": pred}
        for r, ref, pred in list(zip(gen_rows, references, predictions))[: cfg.eval.num_samples]
    ]
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def comparison_rows(base: dict, tuned: dict | None) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, change) rows; fine-tuned columns are empty for a baseline alone."""
    rows = []
    for key, digits in (("loss", 4), ("perplexity", 2)):
        b = base[key]
        t = tuned[key] if tuned else None
        rows.append((key, f"{b:.{digits}f}", "" if t is None else f"{t:.{digits}f}",
                     "" if t is None else f"{t - b:+.{digits}f}"))
    em_b, em_t = base.get("exact_match"), (tuned or {}).get("exact_match")
    if em_b:
        for task in [*em_b["by_task"], "overall"]:
            b = em_b["overall"] if task == "overall" else em_b["by_task"][task]
            t = None if not em_t else em_t["overall"] if task == "overall" else em_t["by_task"].get(task)
            change = "" if t is None else f"{100 * (t - b):+.1f} pts"
            label = f"exact match: {task}" + (f" (n={em_b['counts'][task]})" if task != "overall" else "")
            rows.append((label, _pct(b), _pct(t) if t is not None else "", change))
    return rows


def print_report(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 100))
    base, tuned = result["baseline"], result.get("finetuned")
    title = f"{'Evaluation' if tuned else 'Baseline'} on {base['examples']} held-out examples"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("base", justify="right")
    if tuned:
        table.add_column("fine-tuned", justify="right")
        table.add_column("change", justify="right")
    for row in comparison_rows(base, tuned):
        table.add_row(*(row if tuned else row[:2]))
    console.print(table)
    if not (base.get("samples") or (tuned or {}).get("samples")):
        return
    samples = Table(title="Sample generations", show_lines=True)
    for col in ("prompt", "reference", "base") + (("fine-tuned",) if tuned else ()):
        samples.add_column(col, overflow="fold")
    tuned_samples = (tuned or {}).get("samples") or []
    for i, s in enumerate(base.get("samples") or []):
        prompt = s["instruction"] + (f"\n{s['input']}" if s["input"] else "")
        cells = [prompt, s["reference"], repr(s["prediction"])]
        if tuned:
            cells.append(repr(tuned_samples[i]["prediction"]) if i < len(tuned_samples) else "")
        samples.add_row(*cells)
    console.print(samples)
    if not base.get("exact_match"):
        console.print("No exact match: this data set has no `task` column with checkable answers; "
                      "loss and perplexity only.")
