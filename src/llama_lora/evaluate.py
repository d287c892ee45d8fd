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
