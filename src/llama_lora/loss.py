"""The training objective: summed cross-entropy over response tokens (train and scoring share it).

Two ways to compute it, equal in value and gradient (tests/unit/test_chunked_loss.py):

- unchunked: lm_head over the positions that predict a response token (logits_to_keep), then one
  cross-entropy over those fp32 logits. With a 128k vocabulary those logits, their log-softmax and
  gradient are the largest tensors of a step (the planner's "logits/loss" term).
- chunked (training.loss_chunk_size): the model returns the final hidden states of those positions
  instead of logits, and lm_head + cross-entropy run over `chunk` positions at a time, so only one
  chunk's logits ever exist. On CUDA with liger-kernel installed its fused linear-cross-entropy (a
  maintained Triton kernel doing the same) runs it; elsewhere the torch version below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_lora.data import IGNORE_INDEX

# training.loss_chunk_size=None (auto): chunk from this vocabulary size on, AUTO_CHUNK positions at a
# time. Below it the logits are small next to the activations and one cross-entropy is simplest.
# Both figures come from the measurement in benchmarks/README.md, "Chunked loss".
AUTO_MIN_VOCAB = 32_768
AUTO_CHUNK = 512


def chunk_positions(setting: int | None, vocab_size: int) -> int:
    """Positions per chunk that `training.loss_chunk_size` means for a vocabulary (0 = unchunked)."""
    if setting is None:
        return AUTO_CHUNK if vocab_size >= AUTO_MIN_VOCAB else 0
    return setting


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The lm_head of a (PEFT-, DDP- or accelerate-wrapped) causal LM."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_output_embeddings()


def response_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens, and their count.

    Only positions whose next token is a response token go through lm_head (logits_to_keep): with a
    128k vocabulary the logits are the largest activation, and prompt positions never need them.
    `chunk_size`: training.loss_chunk_size (None: auto by vocabulary size, 0: one cross-entropy,
    N: N response positions per chunk).
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions predicting a label
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept_targets = targets[:, keep]
    count = int((kept_targets != IGNORE_INDEX).sum())
    head = output_head(model)
    chunk = chunk_positions(chunk_size, head.out_features)
    if not chunk or head.weight.requires_grad:  # a trained head would need its own gradient: not chunked
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), kept_targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return loss, count
    hidden = _final_hidden_states(model, head, inputs, keep)  # B x K x H, what lm_head would have read
    mask = kept_targets != IGNORE_INDEX
    h, t = hidden[mask], kept_targets[mask]  # labelled positions only (a padded row's gaps drop out)
    return chunked_linear_cross_entropy_sum(h, head.weight, head.bias, t, chunk), count


def _final_hidden_states(model, head, inputs, keep) -> torch.Tensor:
    """The hidden states the model's forward hands lm_head at `keep`, with lm_head fed nothing.

    The model is called as a whole (through its DDP/PEFT wrappers, whose forward a data-parallel
    backward relies on) and a forward pre-hook on lm_head, torch's extension point for a module's
    input, takes the hidden states and gives lm_head an empty slice: no logits are computed.
    """
    captured: list[torch.Tensor] = []

    def take(_module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def chunked_linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_i CE(h_i @ weight.T + bias, targets_i) over N positions, `chunk` rows of logits at a time.

    `weight` (lm_head) is frozen. On CUDA with liger-kernel installed its fused linear-cross-entropy
    runs this; otherwise the torch Function below, which does what that kernel does: each chunk's
    gradient with respect to h is computed in the forward, right after its logits, and only that
    (N x H, the size of h) is kept for the backward. Under torch.utils.checkpoint instead, the backward
    would recompute every chunk's logits: one more vocabulary-sized matmul per step for the same memory.
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0  # no response token: a zero still connected to the graph
    if h.is_cuda and bias is None:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pass
        else:
            return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
                weight.to(h.dtype), h, targets)
    need_grad = torch.is_grad_enabled() and h.requires_grad
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, chunk, need_grad)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ W.T (+ b) in chunks of rows, the h-gradient formed chunk by chunk.

    The arithmetic follows the unchunked path op for op (logits in the matmul's dtype, upcast to fp32
    for the softmax; the logits' gradient cast back to that dtype for the matmul with W), so under
    autocast and in fp32 alike the two agree to rounding. The loss must be used linearly (a scale on
    a sum, as train.py's normalisation is): the backward only scales the stored gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, need_grad):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        # The matmuls' dtype: autocast's where it is on, else the weight's. The weight is cast once here:
        # autocast would cast a frozen weight again at every call (it caches casts of trained leaves only).
        device = h.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        weight = weight.to(mm_dtype)
        for start in range(0, h.shape[0], chunk):
            h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h_c, weight, bias)
            # The log-sum-exp and softmax in place over the one fp32 logits buffer (torch.logsumexp and
            # softmax would each allocate chunk x vocab temporaries): shift by the row max, exponentiate,
            # normalise. CE = log(sum exp(z - max)) - (z_target - max).
            logits = logits.float()
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_logit = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)
            sums = logits.exp_().sum(dim=-1)
            total += (sums.log() - target_logit).sum()
            if need_grad:
                # d CE / d logits = softmax - one_hot.
                probs = logits.div_(sums.unsqueeze(1))
                probs[torch.arange(probs.shape[0], device=probs.device), t_c] -= 1.0
                grad_h[start : start + chunk] = (probs.to(mm_dtype) @ weight).to(h.dtype)
                del probs
            del logits  # before the next chunk's logits are allocated: one buffer at a time
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None
