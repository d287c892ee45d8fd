"""The embedded tiny Llama base model: create, pre-train, save like a hub model.

Why pre-train at all: LoRA on a frozen, randomly initialised model learns almost nothing
in minutes. A base that already "speaks" the chat format and has character and number
skills lets a short LoRA run learn the new FINETUNE task families.

Why ship the result: the recipe below takes about 14 minutes on 2 CPU cores. It runs once, on
a maintainer's machine (`python -m llama_lora.embedded.base_model`), and its weights (1.7 MB,
checksummed) ship in the package, so a user's first run installs them in under a second. The
same code pre-trains here whenever the shipped file is missing or another recipe is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .data import PRETRAIN_TASKS, PRETRAIN_WEIGHTS, generate_records, to_messages
from .tokenizer import END_OF_TEXT, build_tokenizer

logger = logging.getLogger(__name__)

# Pre-training recipe (part of the cache version: change it -> bump the directory name).
PRETRAIN_STEPS = 10000
COPY_STEPS = 600  # the copy-only start (below); copying is learnt in ~500 steps
PRETRAIN_BATCH_SIZE = 16
PRETRAIN_LR = 1e-3  # 3e-3 was measured to stall the copy task
COMPLETE_MARKERS = ("config.json", "model.safetensors", "embedded.json")
# The recipe's result, pre-trained once and shipped in the package (`ship` below): a first run loads it in
# under a second instead of pre-training for minutes.
SHIPPED = Path(__file__).with_name("base")


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 384,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    """A ~0.4M-parameter Llama (GQA, RoPE, SwiGLU, RMSNorm: the real architecture, small)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # embedding and LM head are both vocab x hidden: share them
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def complete(path: Path) -> bool:
    return all((path / name).is_file() for name in COMPLETE_MARKERS)


def _batch(tok: PreTrainedTokenizerBase, records: list[dict]) -> dict[str, torch.Tensor]:
    """Chat-render records and right-pad them. The loss covers only the answer and its
    <|eot_id|>, what the model must generate: the prompts are mostly random letters, whose
    loss is noise (measured here: adding it did not speed learning up)."""
    texts = [tok.apply_chat_template(to_messages(r), tokenize=False) for r in records]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    prompts = [tok.apply_chat_template(to_messages(r)[:1], add_generation_prompt=True, tokenize=False) for r in records]
    for i, ids in enumerate(tok(prompts, add_special_tokens=False)["input_ids"]):
        labels[i, : len(ids)] = -100  # the prompt is a prefix of the full rendering
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def pretrain(
    model: LlamaForCausalLM, tok, steps: int, seed: int, batch_size: int = PRETRAIN_BATCH_SIZE, lr: float = PRETRAIN_LR
) -> float:
    """Full fine-tuning on PRETRAIN_TASKS records; returns the mean loss of the last steps.

    Curriculum: the first COPY_STEPS steps are the copy task alone. Measured here, a
    tiny model given the full task mix from the start does not learn to copy within the
    budget, while copy alone forms the copying (induction) circuit in ~200 steps, after
    which the other character tasks, all variations on copying, come quickly.
    """
    copy_steps = min(steps // 4, COPY_STEPS)
    records = generate_records(copy_steps * batch_size, seed=seed + 1, tasks={"copy": PRETRAIN_TASKS["copy"]})
    records += generate_records((steps - copy_steps) * batch_size, seed=seed + 2, tasks=PRETRAIN_TASKS,
                                weights=PRETRAIN_WEIGHTS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup, decay = max(1, steps // 50), max(1, steps - copy_steps)

    def schedule(s: int) -> float:  # warm-up, constant through the copy phase, cosine to 10% after
        if s < copy_steps:
            return min(1.0, (s + 1) / warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - copy_steps) / decay))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    recent: list[float] = []
    for step in range(steps):
        loss = model(**_batch(tok, records[step * batch_size : (step + 1) * batch_size])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            logger.info("pretrain step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    return sum(recent) / max(1, len(recent))


def build_base_model(out_dir: str | Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS,
                     shipped: Path | None = SHIPPED) -> Path:
    """Create the tiny base model + tokenizer in ``out_dir``: the shipped pre-trained weights when they
    are what was asked for (the recipe's seed and steps), else by pre-training here.

    Built in a sibling ``.tmp-<pid>`` directory then renamed into place, so an interrupted
    build never leaves a half-written model; an existing complete build is reused as is.
    """
    out_dir = Path(out_dir)
    if complete(out_dir):
        return out_dir
    start = time.perf_counter()
    tok = build_tokenizer()
    eot, eos_text = tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TEXT)
    config = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    use_shipped = (shipped is not None and (shipped / "model.safetensors").is_file()
                   and seed == 0 and pretrain_steps == PRETRAIN_STEPS)
    # Same seed -> same initial weights and run; fork_rng leaves the caller's RNG state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        if use_shipped:
            info = _load_shipped(model, shipped)
            logger.info("installing the shipped embedded base model (%d params) into %s", n_params, out_dir)
        else:
            logger.info("building embedded base model (%d params, %d steps) into %s", n_params, pretrain_steps, out_dir)
            final_loss = pretrain(model, tok, pretrain_steps, seed) if pretrain_steps > 0 else float("nan")
            info = {
                "seed": seed, "params": n_params, "pretrain_steps": pretrain_steps,
                "pretrain_batch_size": PRETRAIN_BATCH_SIZE, "pretrain_lr": PRETRAIN_LR,
                "final_pretrain_loss": None if math.isnan(final_loss) else round(final_loss, 4),
                "seconds": round(time.perf_counter() - start, 1), "pretrain_tasks": sorted(PRETRAIN_TASKS),
            }
    # Stop on either end-of-turn or end-of-text, as Llama-3 Instruct does.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[eot, eos_text], pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=64,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "embedded.json").write_text(json.dumps(info, indent=2) + "\n")
        if complete(out_dir):  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)  # a stale, incomplete directory
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("embedded base model ready in %.1fs: %s", time.perf_counter() - start, out_dir)
    return out_dir


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_shipped(model: LlamaForCausalLM, shipped: Path) -> dict:
    """Load the shipped weights into `model` (strictly: every tensor, right shapes); returns their record."""
    from llama_lora.errors import LlamaLoraError

    info = json.loads((shipped / "embedded.json").read_text())
    weights = shipped / "model.safetensors"
    if _sha256(weights) != info.get("sha256"):
        raise LlamaLoraError(
            f"The embedded base model's weights shipped with llama-lora ({weights}) do not match their "
            "recorded checksum: the installation is damaged. Reinstall llama-lora (pip install --force-reinstall "
            "--no-deps llama-lora, or `make install` in a checkout).")
    state = load_file(weights)
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings)
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:
        raise LlamaLoraError(f"The shipped embedded base model lacks {sorted(missing)[:3]}: reinstall llama-lora.")
    model.tie_weights()
    return {**info, "source": "shipped"}


def ship(dest: Path = SHIPPED) -> Path:
    """Pre-train the base with the recipe above and write it into the package (a maintainer's step, run
    when the recipe changes: `python -m llama_lora.embedded.base_model`). Minutes on a CPU, once, instead
    of in every user's first run."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = build_base_model(Path(tmp) / "base", shipped=None)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built / "model.safetensors", dest / "model.safetensors")
        info = json.loads((built / "embedded.json").read_text())
        info["sha256"] = _sha256(dest / "model.safetensors")
        (dest / "embedded.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(ship())
