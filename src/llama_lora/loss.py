"""The training objective: summed cross-entropy over response tokens (train and scoring share it)."""

from __future__ import annotations

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
