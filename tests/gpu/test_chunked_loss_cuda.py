"""The chunked loss on CUDA (issue 15): liger-kernel's fused linear-cross-entropy where installed, the torch
version otherwise, equal to the unchunked loss under bf16 autocast, with far less peak memory.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with `pytest tests/gpu -v`.
"""

from __future__ import annotations

import random

import pytest
import torch

from llama_lora import loss as loss_lib
from llama_lora.data import IGNORE_INDEX, collate_packed
from llama_lora.loss import response_loss_sum

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llama_lora.adapter import apply_adapter
    from llama_lora.config.schema import PeftConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    base.config.use_cache = False
    model = apply_adapter(base, PeftConfig(r=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("liger", [False, True], ids=["torch", "liger"])
def test_chunked_equals_unchunked_under_bf16_autocast(liger, monkeypatch):
    if liger:
        pytest.importorskip("liger_kernel")
    else:  # the torch version even where liger-kernel is installed
        monkeypatch.setitem(__import__("sys").modules, "liger_kernel.transformers.fused_linear_cross_entropy", None)
    vocab = 128_256
    model = _model(vocab)
    rng = random.Random(0)
    examples = []
    for _ in range(4):
        ids = [rng.randrange(1, vocab) for _ in range(256)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 32 + ids[32:]})
    batch = {k: v.cuda() for k, v in collate_packed(examples).items()}
    results = {}
    for chunk in (0, loss_lib.AUTO_CHUNK):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = response_loss_sum(model, batch, chunk)
        (loss / n).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        results[chunk] = (float(loss) / n, {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad},
                          peak)
    (l0, g0, p0), (l1, g1, p1) = results[0], results[loss_lib.AUTO_CHUNK]
    assert abs(l0 - l1) < 1e-2 * abs(l0)
    for k in g0:
        assert float((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-12)) < 5e-2, k
    full_logits = 4 * 224 * vocab * 4
    assert p0 - p1 > full_logits, (p0, p1)
