"""The chunked loss (training.loss_chunk_size, issue 15) equals the unchunked one in value and gradients
(PEFT and lean LoRA/DoRA, packed and padded batches, with gradient checkpointing, under bf16 autocast),
never forms a micro-batch's full logits, and the planner counts chunk-sized logits."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_lora import loss as loss_lib
from llama_lora.config.schema import Config
from llama_lora.data import IGNORE_INDEX, collate_packed, collate_padded
from llama_lora.lean import LeanPolicy
from llama_lora.loss import chunk_positions, response_loss_sum
from llama_lora.planner import measure_peak_bytes, plan_memory
from tests.helpers import LEAN_CFG, tiny_peft_model


def _examples(lengths, vocab=LEAN_CFG["vocab_size"], seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def _loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss, n = response_loss_sum(model, batch, chunk)
    (loss / n).backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_equal(a, b, rtol=1e-5, atol=1e-6):
    (loss_a, n_a, g_a), (loss_b, n_b, g_b) = a, b
    assert n_a == n_b > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol * n_a)
    assert g_a.keys() == g_b.keys() and g_a
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("lean", [None, LeanPolicy(lean=True), LeanPolicy(lean=True, merged=True)],
                         ids=["peft", "lean", "lean-merged"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunked_loss_and_gradients_equal_unchunked(dora, lean, packed):
    model = tiny_peft_model(dora, lean=lean)
    examples = _examples([9, 23, 5, 17])
    batch = collate_packed(examples) if packed else collate_padded(examples, pad_id=0)
    full = _loss_and_grads(model, batch, 0)
    # 29 response positions: chunks of 7 leave a short last one; 1000 is one chunk of everything.
    for chunk in (7, 1000):
        _assert_equal(_loss_and_grads(model, batch, chunk), full)


def test_chunked_equals_unchunked_with_gradient_checkpointing_and_under_bf16_autocast():
    model = tiny_peft_model(False, checkpointing=True, lean=LeanPolicy(lean=True))
    batch = collate_packed(_examples([15, 30, 11]))
    _assert_equal(_loss_and_grads(model, batch, 6), _loss_and_grads(model, batch, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, full = _loss_and_grads(model, batch, 6), _loss_and_grads(model, batch, 0)
    _assert_equal(chunked, full, rtol=2e-2, atol=2e-3)  # bf16 rounds both the same way, not bit for bit


def test_no_response_token_gives_a_connected_zero():
    model = tiny_peft_model(False)
    batch = collate_packed([{"input_ids": [3, 4, 5, 6], "labels": [IGNORE_INDEX] * 4}] + _examples([6]))
    batch["labels"][:] = IGNORE_INDEX
    loss, n = response_loss_sum(model, batch, 4)
    assert n == 0 and float(loss) == 0.0
    loss.backward()  # a micro-batch without response tokens still steps (its gradients are zero)


def test_the_full_logits_never_exist():
    """A 32k vocabulary: the chunked step's peak is below the unchunked one by about the full fp32
    logits and their gradient buffers, and lm_head itself is handed no positions at all."""
    torch.manual_seed(0)
    cfg = dict(LEAN_CFG, vocab_size=32_768)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.float32)
    base.config.use_cache = False
    from llama_lora.adapter import apply_adapter
    from llama_lora.config.schema import PeftConfig

    model = apply_adapter(base, PeftConfig(r=4, target_modules="all-linear"))
    batch = collate_packed(_examples([128] * 4, vocab=32_768))  # 256 response positions
    full_logits = 256 * 32_768 * 4
    shapes = []
    handle = model.get_base_model().lm_head.register_forward_hook(lambda m, a, out: shapes.append(out.shape))

    def step(chunk):
        loss, n = response_loss_sum(model, batch, chunk)
        (loss / n).backward()

    peaks = {chunk: measure_peak_bytes(lambda: step(chunk), model) for chunk in (0, 32)}
    handle.remove()
    assert shapes[0][1] == 256 and shapes[1][1] == 0  # unchunked: 256 positions; chunked: none
    assert peaks[0] - peaks[32] > 2 * full_logits, peaks
    assert chunk_positions(None, 32_768) == loss_lib.AUTO_CHUNK and chunk_positions(None, 32_000) == 0
    assert chunk_positions(0, 128_256) == 0 and chunk_positions(64, 100) == 64


def test_planner_counts_chunk_sized_logits():
    llama_1b = LlamaConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    plans = {size: plan_memory(Config(training={"loss_chunk_size": size}), llama_1b, "cpu", 4)
             for size in (0, None, 256)}
    full, auto, small = (plans[k].breakdown["logits/loss"] for k in (0, None, 256))
    assert full > 4 * auto > 0 and auto > small
    assert "chunks of" in plans[None].report() and "chunks of" not in plans[0].report()
