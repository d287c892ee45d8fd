"""Padding-free packing: the loss of a packed batch equals the padded batch's, with SDPA's block mask and
with llama-lora's per-example (varlen) attention; length-grouped batching is deterministic and pads less.
The varlen tests also check that the varlen path ran: transformers dispatches to llama-lora's
varlen_attention, and attention is computed over each example alone, not over the packed row."""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora.attention import VARLEN_ATTENTION, use_varlen_attention, varlen_attention
from llama_lora.data import IGNORE_INDEX, collate_packed, collate_padded
from llama_lora.loss import response_loss_sum
from llama_lora.sampler import StepSampler


N_LAYERS = 2


def _model(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, 97) for _ in range(n)]
        n_prompt = n // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return out


def _separate_loss(model, examples):
    total, count = 0.0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@contextlib.contextmanager
def _attention_calls(model, varlen: bool):
    """Checks that transformers dispatches `model`'s attention to varlen_attention (or not), and yields
    the (batch, query length) of every scaled_dot_product_attention call made meanwhile: the varlen path
    on CPU makes one per packed example and layer, over that example's tokens only; SDPA, with a mask or
    as varlen_attention's fallback for padded batches, one per layer over the whole row."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    assert (impl == VARLEN_ATTENTION and ALL_ATTENTION_FUNCTIONS[impl] is varlen_attention) == varlen, impl
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        calls = []
        yield calls
        calls.extend(tuple(c.args[0].shape[::2]) for c in sdpa.call_args_list)


@pytest.mark.parametrize("varlen", [False, True], ids=["sdpa-block-mask", "varlen"])
@torch.no_grad()
def test_packed_loss_equals_padded_and_separate_loss(varlen):
    model = _model()
    if varlen:
        assert use_varlen_attention(model)
    examples = _examples([9, 23, 5, 17])
    packed_sum, packed_n = response_loss_sum(model, collate_packed(examples))
    padded_sum, padded_n = response_loss_sum(model, collate_padded(examples, pad_id=0))
    separate_sum, separate_n = _separate_loss(model, examples)
    assert packed_n == padded_n == separate_n == sum(len(e["input_ids"]) - len(e["input_ids"]) // 2 for e in examples)
    # The same mean over response tokens either way, to fp32 rounding.
    assert abs(float(packed_sum) / packed_n - float(padded_sum) / padded_n) < 1e-5
    assert abs(float(packed_sum) / packed_n - separate_sum / separate_n) < 1e-5


@torch.no_grad()
def test_varlen_attention_logits_match_separate_passes():
    model = _model()
    assert use_varlen_attention(model)
    lengths = [12, 3, 20]
    examples = _examples(lengths)
    batch = collate_packed(examples)
    with _attention_calls(model, varlen=True) as calls:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert calls == [(1, length) for length in lengths] * N_LAYERS  # each example attended alone, in every layer
    start = 0
    for e in examples:
        n = len(e["input_ids"])
        alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n
    # A padded batch (attention mask given) still goes through SDPA with its mask, and agrees too.
    padded = collate_padded(examples, pad_id=0)
    with _attention_calls(model, varlen=True) as calls:
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    assert calls == [(len(lengths), max(lengths))] * N_LAYERS
    torch.testing.assert_close(out[1, :3], logits[12:15], atol=1e-5, rtol=1e-5)


def test_varlen_gradients_match_block_mask():
    """Training goes through backward: the gradients of both attention paths agree too, and each path is
    the one that ran (one whole-row SDPA per layer with the block mask, one per example with varlen)."""
    lengths = [7, 15, 11]
    grads = []
    for varlen in (False, True):
        model = _model()
        if varlen:
            assert use_varlen_attention(model)
        model.train()
        with _attention_calls(model, varlen) as calls:
            loss, n = response_loss_sum(model, collate_packed(_examples(lengths)))
        assert calls == ([(1, length) for length in lengths] if varlen else [(1, sum(lengths))]) * N_LAYERS
        (loss / n).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _padding_fraction(batches):
    padded = sum(len(mb) * max(len(e["input_ids"]) for e in mb) for mb in batches)
    real = sum(len(e["input_ids"]) for mb in batches for e in mb)
    return 1 - real / padded


def test_group_by_length_is_deterministic_complete_and_pads_less():
    rng = random.Random(1)
    examples = _examples([int(rng.lognormvariate(4.5, 0.6)) + 4 for _ in range(200)])
    steps_per_epoch = len(examples) // 8

    def epoch(group, epoch_index=0, seed=3):
        # A new sampler each time: the order is recomputed, never read from an earlier epoch's cache.
        sampler = StepSampler(examples, seed, micro_batch_size=4, accumulation=2, group_by_length=group)
        assert sampler.steps_per_epoch == steps_per_epoch
        return [sampler.batches(epoch_index * steps_per_epoch + s) for s in range(1, steps_per_epoch + 1)]

    grouped, plain = epoch(True), epoch(False)
    # Every example once per epoch, in micro-batches of the configured size.
    seen = [id(e) for step in grouped for mb in step for e in mb]
    assert len(seen) == len(set(seen)) == steps_per_epoch * 8
    assert all(len(mb) == 4 for step in grouped for mb in step)
    # A pure function of (seed, epoch): recomputed (cache cleared by another epoch) it is identical,
    # so a resumed run sees the same batches; another epoch is a different order.
    other = epoch(True, epoch_index=1)
    assert epoch(True) == grouped and other != grouped
    flat = lambda ep: [mb for step in ep for mb in step]  # noqa: E731
    assert _padding_fraction(flat(grouped)) < 0.5 * _padding_fraction(flat(plain))
    # Steps are still shuffled: not simply longest-first.
    first_lengths = [max(len(e["input_ids"]) for e in step[0]) for step in grouped]
    assert first_lengths != sorted(first_lengths, reverse=True)
