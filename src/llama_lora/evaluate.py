"""Loss and perplexity over response tokens (the same function trains and evaluates)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llama_lora.data import IGNORE_INDEX


def response_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens, and their count.

    Only positions whose next token is a response token go through lm_head (logits_to_keep): with a
    128k vocabulary the logits are the largest activation, and prompt positions never need them.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions predicting a label
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    kept_targets = targets[:, keep]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), kept_targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((kept_targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, examples: list[dict], collate, batch_size: int, device) -> dict[str, float]:
    """Mean response-token loss and perplexity over `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size]).items()}
        loss, n = response_loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


# ----------------------------------------------------------------------------------------------------
# The eval/baseline commands: loss/perplexity plus exact match per task family and sample generations.


def exact_match_scores(predictions: list[str], references: list[str], tasks: list[str]) -> dict:
    """Share of exact (whitespace-trimmed) matches, per task family and overall."""
    from llama_lora.embedded.data import exact_match

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
    from llama_lora.data import make_collate, tokenize_dataset
    from llama_lora.generation import generate_batched, generation_config

    examples, _ = tokenize_dataset(ds, cfg.data, tokenizer, fmt, "test")
    result = evaluate_loss(model, examples, make_collate(cfg.data.packing, tokenizer.pad_token_id),
                           cfg.eval.batch_size, device)
    result["examples"] = len(examples)
    cols = cfg.data.columns
    rows = [r for r in ds if str(r.get(cols.instruction) or "").strip() and str(r.get(cols.output) or "").strip()]
    checkable = "task" in ds.column_names
    gen_rows = rows if checkable else rows[: cfg.eval.num_samples]
    prompts = [fmt.prompt(tokenizer, str(r[cols.instruction]).strip(), str(r.get(cols.input) or "").strip())
               for r in gen_rows]
    gen = generation_config(model, tokenizer, cfg.eval.max_new_tokens)
    predictions = [p.strip() for p in generate_batched(model, tokenizer, prompts, gen, cfg.eval.batch_size)]
    references = [str(r[cols.output]).strip() for r in gen_rows]
    result["exact_match"] = (
        exact_match_scores(predictions, references, [str(r["task"]) for r in gen_rows]) if checkable else None
    )
    result["samples"] = [
        {"instruction": str(r[cols.instruction]).strip(), "input": str(r.get(cols.input) or "").strip(),
         "reference": ref, "prediction": pred}
        for r, ref, pred in list(zip(gen_rows, references, predictions))[: cfg.eval.num_samples]
    ]
    return result
