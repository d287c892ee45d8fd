"""Unit tests of the embedded default (tokenizer, data generator, tiny base model builder).

Fast: the base model is built with pretrain_steps=2 here; the real pre-training is only
exercised by the slow end-to-end tests.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llama_lora import embedded
from llama_lora.embedded import base_model, data
from llama_lora.embedded.tokenizer import CHAT_TEMPLATE, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- tokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello wörld 12+3", "  two  spaces\n\nand\ttabs ", "日本 🙂", ""])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text).input_ids) == text


def test_tokenizer_one_token_per_ascii_char_and_no_auto_specials(tok):
    assert len(tok("abc").input_ids) == 3
    assert tok("hello world").input_ids == tok("hello world", add_special_tokens=True).input_ids
    assert not set(tok("hello world").input_ids) & set(tok.all_special_ids)


def test_tokenizer_special_tokens(tok):
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id != tok.eos_token_id
    for special in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        ids = tok(special).input_ids
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
    assert len(tok) == 256 + 6


def test_chat_template_renders_llama3_format(tok):
    messages = [{"role": "user", "content": "Reverse:\n\nabc "}, {"role": "assistant", "content": "cba"}]
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nReverse:\n\nabc<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ncba<|eot_id|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert expected.startswith(prompt)  # the prompt is a prefix: label masking relies on it
    ids = tok(expected, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tokenizer_save_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert loaded.chat_template == tok.chat_template == CHAT_TEMPLATE
    text = "Hello wörld 12+3"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == text


# --- data ------------------------------------------------------------------------------


def test_families_are_disjoint_and_enough():
    assert len(data.FINETUNE_TASKS) >= 4
    assert not set(data.FINETUNE_TASKS) & set(data.PRETRAIN_TASKS)


def test_generate_splits_deterministic():
    a = data.generate_splits(seed=0, n_train=80, n_validation=20, n_test=20)
    assert a == data.generate_splits(seed=0, n_train=80, n_validation=20, n_test=20)
    assert a != data.generate_splits(seed=1, n_train=80, n_validation=20, n_test=20)
    assert data.generate_records(30, seed=3) == data.generate_records(30, seed=3)


def test_generate_splits_sizes_disjoint_and_valid():
    splits = data.generate_splits(seed=0, n_train=200, n_validation=40, n_test=60)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "validation": 40, "test": 60}
    keys = {name: {(r["instruction"], r["input"]) for r in recs} for name, recs in splits.items()}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    for rec in (r for recs in splits.values() for r in recs):
        assert set(rec) == {"instruction", "input", "output", "task"}
        assert rec["instruction"].strip() and rec["output"].strip()
        assert rec["task"] in data.FINETUNE_TASKS
    assert {r["task"] for r in splits["train"]} == set(data.FINETUNE_TASKS)


def test_answers_are_correct():
    checks = {
        "uppercase": str.upper,
        "reverse": lambda x: x[::-1],
        "sort": lambda x: "".join(sorted(x)),
        "add": lambda x: str(sum(int(n) for n in x.split("+"))),
    }
    for rec in data.generate_splits(seed=0, n_train=100, n_validation=0, n_test=0)["train"]:
        if rec["task"] in checks:
            assert rec["output"] == checks[rec["task"]](rec["input"]), rec


def test_pretrain_records_cover_their_families():
    records = data.generate_records(3 * len(data.PRETRAIN_TASKS), seed=0)
    assert {r["task"] for r in records} == set(data.PRETRAIN_TASKS)
    assert all(r["output"] for r in records)


def test_write_jsonl(tmp_path):
    splits = data.generate_splits(seed=0, n_train=10, n_validation=3, n_test=4)
    paths = data.write_jsonl(splits, tmp_path / "ds")
    assert {p.name for p in paths.values()} == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    for name, path in paths.items():
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == splits[name]


def test_exact_match():
    from llama_lora.scoring import exact_match

    assert exact_match(" HELLO\n", "HELLO")
    assert not exact_match("HELL", "HELLO")


def test_to_messages():
    msgs = data.to_messages({"instruction": "Add.", "input": "1 + 2", "output": "3"})
    assert msgs[0] == {"role": "user", "content": "Add.\n\n1 + 2"}
    assert data.to_messages({"instruction": "Hi", "input": "", "output": "x"})[0]["content"] == "Hi"


# --- base model ------------------------------------------------------------------------


def test_tiny_config_size(tok):
    config = base_model.tiny_llama_config(len(tok))
    model = base_model.LlamaForCausalLM(config)
    assert 200_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000
    assert config.max_position_embeddings == 512


def test_build_base_model(tmp_path):
    out = tmp_path / "cache" / "tiny-llama"
    assert base_model.build_base_model(out, pretrain_steps=2) == out
    assert {"config.json", "model.safetensors", "embedded.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    assert sorted(gen.eos_token_id) == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|end_of_text|>")])
    assert gen.pad_token_id == tok.pad_token_id == model.config.pad_token_id
    info = json.loads((out / "embedded.json").read_text())
    assert info["pretrain_steps"] == 2 and info["seed"] == 0 and info["params"] > 0

    messages = [{"role": "user", "content": "Copy:\n\ncat"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert base_model.build_base_model(out, pretrain_steps=2) == out  # complete: not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_build_base_model_is_deterministic(tmp_path):
    a = base_model.build_base_model(tmp_path / "a", pretrain_steps=2)
    b = base_model.build_base_model(tmp_path / "b", pretrain_steps=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_build_replaces_incomplete_dir_and_cleans_tmp_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a half-written leftover: not complete
    base_model.build_base_model(out, pretrain_steps=1)
    assert base_model.complete(out)

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(base_model.LlamaForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        base_model.build_base_model(tmp_path / "n", pretrain_steps=1)
    assert not (tmp_path / "n").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- cache helpers ---------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_LORA_CACHE", str(tmp_path / "c"))
    assert embedded.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLAMA_LORA_CACHE")
    assert embedded.default_cache_dir() == embedded.Path.home() / ".cache" / "llama_lora"


def test_ensure_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "DATASET_SIZES", {"n_train": 40, "n_validation": 8, "n_test": 12})
    out = embedded.ensure_dataset(tmp_path)
    assert out == tmp_path / embedded.DATASET_DIRNAME
    lines = {name: (out / name).read_text().splitlines() for name in embedded.SPLIT_FILES}
    assert [len(v) for v in lines.values()] == [40, 8, 12]
    mtime = (out / "train.jsonl").stat().st_mtime_ns
    assert embedded.ensure_dataset(tmp_path) == out  # reused, not regenerated
    assert (out / "train.jsonl").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_ensure_base_model_uses_cache_dir(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(embedded, "build_base_model", lambda out: calls.append(out) or out)
    monkeypatch.setenv("LLAMA_LORA_CACHE", os.fspath(tmp_path))
    assert embedded.ensure_base_model() == tmp_path / embedded.BASE_MODEL_DIRNAME
    assert embedded.ensure_base_model(tmp_path / "x") == tmp_path / "x" / embedded.BASE_MODEL_DIRNAME
    assert len(calls) == 2


# --- the shipped pre-trained base ---------------------------------------------------------


def _greedy_accuracy(model_dir, tasks: dict, n: int = 48) -> float:
    """Exact match of greedy answers on n fresh records of `tasks` (chat-rendered, batch of one)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for rec in data.generate_records(n, seed=123, tasks=tasks):
        prompt = tok.apply_chat_template(data.to_messages(rec)[:1], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        right += tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip() == rec["output"]
    return right / n


def test_shipped_base_is_installed_not_pretrained_and_knows_its_pretraining_tasks(tmp_path, monkeypatch):
    """The package ships the recipe's pre-trained weights (checksummed): a first run copies them in a
    second. They are the pre-trained model, not an initialisation: greedy answers to fresh records of
    the pre-training tasks are right, and the fine-tune families are not solved by the base."""
    shipped = json.loads((base_model.SHIPPED / "embedded.json").read_text())
    assert shipped["pretrain_steps"] == base_model.PRETRAIN_STEPS and shipped["pretrain_tasks"] == sorted(data.PRETRAIN_TASKS)
    monkeypatch.setattr(base_model, "pretrain", lambda *a, **k: pytest.fail("pre-trained instead of installing"))
    out = base_model.build_base_model(tmp_path / "base")
    info = json.loads((out / "embedded.json").read_text())
    assert info["source"] == "shipped" and info["sha256"] == shipped["sha256"]
    assert _greedy_accuracy(out, data.PRETRAIN_TASKS) >= 0.8
    assert _greedy_accuracy(out, data.FINETUNE_TASKS) <= 0.1


def test_a_damaged_shipped_base_is_refused_with_what_to_do(tmp_path):
    from llama_lora.errors import LlamaLoraError

    damaged = tmp_path / "shipped"
    damaged.mkdir()
    (damaged / "embedded.json").write_text((base_model.SHIPPED / "embedded.json").read_text())
    raw = bytearray((base_model.SHIPPED / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(LlamaLoraError, match="damaged. Reinstall"):
        base_model.build_base_model(tmp_path / "base", shipped=damaged)
    assert not (tmp_path / "base").exists()
