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


_SAMPLING = ("do_sample", "temperature", "top_p", "top_k")


def model_sampling(model) -> dict[str, Any]:
    """The sampling the model's own generation_config asks for (Llama-3.2-Instruct: sampling at
    temperature 0.6, top_p 0.9); greedy when it has none."""
    mg = getattr(model, "generation_config", None)
    values = {k: getattr(mg, k, None) for k in _SAMPLING}
    values["do_sample"] = bool(values["do_sample"])
    return values


def generation_config(model, tokenizer, max_new_tokens: int, do_sample: bool | None = False,
                      temperature: float | None = None, top_p: float | None = None) -> GenerationConfig:
    """Stop at every end-of-turn token; decode greedily, or sample; None = what the model's generation_config says.

    generate() fills every field left None from the model's generation_config, so greedy decoding sets the
    sampling fields to their neutral values: a model that samples (Llama-3.2-Instruct: temperature 0.6,
    top_p 0.9) would otherwise hand them over and transformers would warn that they are ignored.
    """
    defaults = model_sampling(model)
    do_sample = defaults["do_sample"] if do_sample is None else do_sample
    if do_sample:
        sampling = {"temperature": defaults["temperature"] if temperature is None else temperature,
                    "top_p": defaults["top_p"] if top_p is None else top_p, "top_k": defaults["top_k"]}
    else:  # transformers' own neutral values (GenerationConfig._get_default_generation_params)
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                            eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                            **{k: v for k, v in sampling.items() if v is not None})


def describe(gen: GenerationConfig, set_by_user: list[str]) -> str:
    """One line saying how infer decodes and where that came from."""
    how = (f"sampling (temperature {gen.temperature if gen.temperature is not None else 1.0}, top_p "
           f"{gen.top_p if gen.top_p is not None else 1.0}{f', top_k {gen.top_k}' if gen.top_k else ''})"
           if gen.do_sample else "greedy decoding")
    where = (f"{', '.join('infer.' + k for k in set_by_user)} as set, the rest from the model's generation_config"
             if set_by_user else "the model's generation_config (set infer.do_sample/temperature/top_p to change it)")
    return f"Generation: {how}, stopping at token ids {list(gen.eos_token_id or [])}: {where}"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], gen: GenerationConfig, streamer=None,
             stopping_criteria=None) -> list[str]:
    """Answers to already-formatted prompts, batched with left padding (so every row ends at its prompt).
    `stopping_criteria` (a StoppingCriteriaList) lets serve stop single rows (per-request limits, cancels)."""
    # The prompts carry their own special tokens (bos from the template), exactly as in training. Left
    # padding is asked for per call: the tokenizer object is shared (serve, eval) and stays as it is.
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left",
                    return_tensors="pt").to(model.device)
    out = model.generate(**enc, generation_config=gen, streamer=streamer, stopping_criteria=stopping_criteria)
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
