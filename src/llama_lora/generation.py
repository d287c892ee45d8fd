"""Generation from a loaded model: stop tokens, the generation config, batched greedy/sampled answers.

Used by infer and by eval/baseline scoring; the model comes from runs.load.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

# Llama 3 ends a turn with <|eot_id|> and a document with <|end_of_text|>; generation must stop at both.
_EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a reply: generation_config's eos ids, the tokenizer's eos, and Llama 3's
    <|eot_id|> / <|end_of_text|> when the vocabulary has them."""
    ids: list[int | None] = []
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _EXTRA_STOP_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_config(model, tokenizer, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0) -> GenerationConfig:
    kwargs: dict[str, Any] = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id, **kwargs,
    )


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, streamer=None) -> list[str]:
    """Answers to already-formatted prompts, batched with left padding (so every row ends at its prompt)."""
    tokenizer.padding_side = "left"
    # The prompts carry their own special tokens (bos from the template), exactly as in training.
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**enc, generation_config=gen, streamer=streamer)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_batched(model, tokenizer, prompts: list[str], gen: GenerationConfig, batch_size: int) -> list[str]:
    # Similar lengths share a batch (less padding); answers come back in the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for j, a in zip(idx, generate(model, tokenizer, [prompts[k] for k in idx], gen)):
            answers[j] = a
    return answers
