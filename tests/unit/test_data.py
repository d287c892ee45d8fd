"""Prompt formatting, label masking, EOS, truncation and batching on hand-checked examples."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from llama_lora.config.schema import DataConfig
from llama_lora.data import (
    ALPACA_NO_INPUT, IGNORE_INDEX, PromptFormat, collate_packed, collate_padded, load_split, load_train_eval,
    tokenize_dataset, tokenize_example,
)
from llama_lora.errors import LlamaLoraError


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def test_chat_rendering_equals_apply_chat_template(tok):
    fmt = PromptFormat("chat", system_prompt="Be brief.")
    prompt, answer = fmt.render(tok, "Reverse the word.", "apple", "elppa")
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the word.\n\napple"},
         {"role": "assistant", "content": "elppa"}], tokenize=False)
    assert prompt + answer == expected
    assert prompt == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the word.\n\napple"}],
        tokenize=False, add_generation_prompt=True)
    assert answer == "elppa<|eot_id|>"


def test_label_mask_covers_prompt_and_keeps_eos(tok):
    fmt = PromptFormat("chat")
    prompt, answer = fmt.render(tok, "Uppercase it.", "cat", "CAT")
    ids, labels = tokenize_example(tok, prompt, answer)
    assert ids == tok(prompt + answer, add_special_tokens=False).input_ids
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # Byte-level tokenizer: the trained tokens are exactly C, A, T and <|eot_id|>.
    assert tok.decode(trained) == "CAT<|eot_id|>"
    assert trained[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
    assert ids[0] == tok.bos_token_id


def test_alpaca_format_masks_prompt_and_appends_eos(tok):
    fmt = PromptFormat("alpaca")
    prompt, answer = fmt.render(tok, "Say hi.", "", "hi")
    assert prompt == tok.bos_token + ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert answer == "hi" + tok.eos_token
    ids, labels = tokenize_example(tok, prompt, answer)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "hi" + tok.eos_token


def test_auto_format_and_chat_without_template(tok):
    assert PromptFormat.choose(DataConfig(), tok).kind == "chat"
    no_template = AutoTokenizer.from_pretrained(tok.name_or_path)
    no_template.chat_template = None
    assert PromptFormat.choose(DataConfig(), no_template).kind == "alpaca"
    with pytest.raises(LlamaLoraError, match="no chat template"):
        PromptFormat.choose(DataConfig(prompt_format="chat"), no_template)


def test_truncation_empty_rows_and_stats_are_reported(tok):
    rows = [
        {"instruction": "Uppercase it.", "input": "cat", "output": "CAT"},
        {"instruction": "", "input": "x", "output": "y"},  # empty instruction: dropped
        {"instruction": "Echo.", "input": None, "output": None},  # missing output: dropped
        {"instruction": "Echo " + "z" * 200, "input": "", "output": "ok"},  # prompt alone too long: dropped
        {"instruction": "Echo.", "input": "", "output": "w" * 300},  # response cut: truncated, kept
    ]
    cfg = DataConfig(max_seq_length=64)
    examples, stats = tokenize_dataset(Dataset.from_list(rows), cfg, tok, PromptFormat("chat"))
    assert stats.rows == 5 and stats.examples == 2
    assert stats.dropped_empty == 2 and stats.empty_row_indices == [1, 2]
    assert stats.truncated == 2 and stats.dropped_no_response == 1
    assert all(len(e["input_ids"]) <= 64 for e in examples)
    assert stats.max_length == 64


def test_missing_column_names_the_columns(tok):
    ds = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    with pytest.raises(LlamaLoraError, match=r"no column\(s\) \['instruction', 'output'\].*data.columns"):
        tokenize_dataset(ds, DataConfig(), tok, PromptFormat("chat"))
    cfg = DataConfig(columns={"instruction": "prompt", "output": "completion"})
    examples, _ = tokenize_dataset(ds, cfg, tok, PromptFormat("chat"))
    assert len(examples) == 1


def test_everything_dropped_is_an_error(tok):
    ds = Dataset.from_list([{"instruction": "x" * 100, "input": "", "output": "y"}])
    with pytest.raises(LlamaLoraError, match="no usable example.*max_seq_length"):
        tokenize_dataset(ds, DataConfig(max_seq_length=16), tok, PromptFormat("chat"))


def test_padded_and_packed_collation():
    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [-100, 5]}
    padded = collate_padded([a, b], pad_id=0)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    packed = collate_packed([a, b])
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert "attention_mask" not in packed


def test_local_files_and_split_slicing(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_split(str(tmp_path / "d.jsonl"), "train[:25%]")) == 5
    assert load_split(str(tmp_path / "d.parquet"), "train[-2:]")["output"] == ["o18", "o19"]
    train, held_out = load_train_eval(DataConfig(source=str(tmp_path / "d.jsonl"), train_split="train", eval_fraction=0.1), seed=0)
    assert len(train) == 18 and len(held_out) == 2
    assert not set(train["output"]) & set(held_out["output"])


def test_directory_with_split_files(embedded_data):
    train, val = load_train_eval(DataConfig(source=str(embedded_data), train_split="train"), seed=0)
    assert len(train) > len(val) > 0  # the directory's validation.jsonl is used


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/data.jsonl", "does not exist"),
    ("./missing_dir/", "does not exist"),
])
def test_missing_local_source(source, message):
    with pytest.raises(LlamaLoraError, match=message):
        load_split(source, "train")


def test_malformed_jsonl_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(LlamaLoraError, match="Could not read data.source"):
        load_split(str(tmp_path / "bad.jsonl"), "train")


def test_packed_batch_has_no_cross_example_attention(tiny_base):
    """Per-example logits of a packed row equal separate forward passes (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 3, 11)]
    packed = collate_packed(examples)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


# ----------------------------------------------------------------------------------------------------
# Values that are not text (issue 19): an error naming the row, the column and the type, never a repr.


def _jsonl_rows(path, outputs):
    rows = [{"instruction": f"Say {k}.", "input": "", "output": f"o{k}"} for k in range(20)]
    for k, v in outputs.items():
        rows[k]["output"] = v
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("value, kind", [
    (["One solution", "is"], "a list"), ({"text": "One solution"}, "a dict"), (True, "a boolean"),
])
def test_non_text_jsonl_values_name_row_column_and_type(tmp_path, tok, value, kind):
    src = _jsonl_rows(tmp_path / "d.jsonl", {16: value})
    with pytest.raises(LlamaLoraError, match=rf"d.jsonl', split 'train', row 17: column 'output' holds {kind} "
                                             r".*not text.*numbers are converted.*data.columns.output="):
        load_train_eval(DataConfig(source=src, train_split="train"), seed=0)
    # Handed to the tokenizer directly (no load-time check), the same error, from the same function.
    with pytest.raises(LlamaLoraError, match=rf"row 17: column 'output' holds {kind}"):
        tokenize_dataset(load_split(src, "train"), DataConfig(source=src), tok, PromptFormat("chat"))


def test_non_text_parquet_columns_are_errors(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = {"instruction": ["a", "b", "c"], "input": ["", "", ""]}
    pq.write_table(pa.table(base | {"output": [["One solution"], None, ["x"]]}), tmp_path / "lists.parquet")
    pq.write_table(pa.table(base | {"output": [None, b"One solution", b"x"]}), tmp_path / "bytes.parquet")
    for name, message in [("lists", r"row 1: column 'output' holds a list \(\['One solution'\]\)"),
                          ("bytes", r"row 2: column 'output' holds bytes \(b'One solution'\)")]:
        cfg = DataConfig(source=str(tmp_path / f"{name}.parquet"), train_split="train", eval_fraction=0.4)
        with pytest.raises(LlamaLoraError, match=message):
            load_train_eval(cfg, seed=0)
        with pytest.raises(LlamaLoraError, match=message):
            tokenize_dataset(load_split(cfg.source, "train"), cfg, tok, PromptFormat("chat"))


def test_a_non_text_input_column_names_its_data_columns_key(tok):
    ds = Dataset.from_list([{"q": "Add.", "ctx": [1, 2], "a": "3"}])
    cfg = DataConfig(columns={"instruction": "q", "input": "ctx", "output": "a"})
    with pytest.raises(LlamaLoraError, match=r"row 1: column 'ctx' holds a list \(\[1, 2\]\).*data.columns.input="):
        tokenize_dataset(ds, cfg, tok, PromptFormat("chat"))


def test_numbers_become_their_text_and_train(tmp_path, tok):
    src = _jsonl_rows(tmp_path / "n.jsonl", {})
    Dataset.from_list([{"instruction": "Add 2 and 3.", "input": 7, "output": 5},
                       {"instruction": "Halve 3.", "input": None, "output": 1.5}]).to_json(str(tmp_path / "n.jsonl"))
    train, held_out = load_train_eval(DataConfig(source=src, train_split="train", eval_fraction=0.5), seed=0)
    fmt = PromptFormat("chat")
    for ds in (Dataset.from_list([{"instruction": "Add 2 and 3.", "input": 7, "output": 5}]),
               Dataset.from_list([{"instruction": "Halve 3.", "input": "", "output": 1.5}]), train, held_out):
        examples, stats = tokenize_dataset(ds, DataConfig(), tok, fmt)
        row = ds[0]
        prompt, answer = fmt.render(tok, row["instruction"], str(row["input"] or ""), str(row["output"]))
        assert stats.examples == 1 and examples[0]["input_ids"] == tokenize_example(tok, prompt, answer)[0]
        assert answer in (f"{row['output']}<|eot_id|>",)


def test_field_text_rules():
    from llama_lora.data import field_text

    assert field_text("a b", "c") == "a b" and field_text(5, "c") == "5" and field_text(1.5, "c") == "1.5"
    assert field_text(None, "c") == "" and field_text(float("nan"), "c") == ""
    for bad in (False, b"x", ["x"], {"x": 1}, ("x",)):
        with pytest.raises(LlamaLoraError, match="column 'c' holds"):
            field_text(bad, "c", 3)


def test_a_huge_value_is_cut_before_tokenizing_without_changing_the_kept_tokens(tok):
    """A 30 MB cell once took a minute to tokenize, to be truncated to max_seq_length tokens anyway."""
    from llama_lora.data import max_value_chars

    cfg = DataConfig(max_seq_length=64)
    words = " ".join(["apple", "river", "stone", "cloud", "music", "zebra"][k % 6] + str(k % 7) for k in range(9000))
    assert len(words) > 2 * max_value_chars(cfg.max_seq_length)
    fmt = PromptFormat("chat")
    for field in ("output", "instruction", "input"):
        row = {"instruction": "Echo.", "input": "", "output": "ok"} | {field: words}
        full_ids, full_labels = tokenize_example(tok, *fmt.render(tok, row["instruction"], row["input"], row["output"]))
        if field != "output":  # the prompt alone is too long: dropped, with or without the cut
            assert all(x == IGNORE_INDEX for x in full_labels[:64])
            with pytest.raises(LlamaLoraError, match="dropped 1 with no response left after truncation"):
                tokenize_dataset(Dataset.from_list([row]), cfg, tok, fmt)
            continue
        examples, stats = tokenize_dataset(Dataset.from_list([row]), cfg, tok, fmt)
        assert stats.truncated == 1
        assert examples[0] == {"input_ids": full_ids[:64], "labels": full_labels[:64]}
