"""Export of a Llama-3.x-shaped model: a 128,256-token byte-level BPE vocabulary with Llama-3's
pre-tokenizer regex and special tokens, <|eot_id|> as the stop token, llama3 RoPE scaling, an untied head.
Built here, tiny in width, so the converter, the read-back and (where installed) llama.cpp see the shape
of a real Llama-3.2 checkpoint without a download."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llama_lora import export
from llama_lora.embedded.tokenizer import CHAT_TEMPLATE
from llama_lora.export.convert import LLAMA3_REGEX
from llama_lora.runs import saved_config

VOCAB, N_SPECIAL = 128_256, 256
SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
            128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Reverse the word garden: nedrag",
          "Add the two numbers. 17 + 25 = 42", "I've been told he's there, you're sure?"] * 20


def _letters(i: int) -> str:
    s = ""
    while True:
        s, i = chr(97 + i % 26) + s, i // 26 - 1
        if i < 0:
            return s


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    split = pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(LLAMA3_REGEX), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core = Tokenizer(models.BPE(ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    data = json.loads(core.to_str())
    vocab = data["model"]["vocab"]
    i = 0
    while len(vocab) < VOCAB - N_SPECIAL:  # the rest of the 128,000 regular tokens: whole words ' abc'
        word = "Ġ" + _letters(i)
        i += 1
        vocab.setdefault(word, len(vocab))
    data["added_tokens"] = [{"id": VOCAB - N_SPECIAL + k, "content": SPECIALS.get(VOCAB - N_SPECIAL + k,
                             f"<|reserved_special_token_{k}|>"), "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for k in range(N_SPECIAL)]
    core = Tokenizer.from_str(json.dumps(data))
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|reserved_special_token_200|>", clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama3") / "model"
    tok = llama3_tokenizer()
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                                               do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow  # 128,256 vocabulary strings through the converter and GGUFReader: ~20 s of CPU
def test_llama3_shaped_model_exports_and_verifies(llama3_model, tmp_path):
    out = export.run(saved_config(llama3_model, [], "export"), dtype="f16", output=str(tmp_path / "exp"))
    report = json.loads((out / "export.json").read_text())
    tok = report["tokenizer"]
    assert tok["vocab_size"] == VOCAB and tok["pre_tokenizer"] == "llama-bpe"
    assert tok["special_ids"]["eos"] == 128009 and tok["stop_token_ids"] == [128001, 128008, 128009]
    assert tok["stop_tokens"] == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    assert report["tensors"]["generated"] == ["rope_freqs.weight"]  # llama3 RoPE scaling, computed by the converter
    assert report["tensors"]["compared"] == 1 + 9 + 2  # embeddings, one block, output norm and untied head
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "PARAMETER temperature 0.6" in modelfile
    assert "PARAMETER top_p 0.9" in modelfile and "PARAMETER num_ctx 131072" in modelfile
    cpp = report["llama_cpp"]
    if cpp["verified"]:
        # llama.cpp adds <|begin_of_text|> itself for llama-bpe, so the template must not write it again.
        assert cpp["add_bos"] is True and 'TEMPLATE """{{ range .Messages }}' in modelfile
        greedy = cpp["greedy"]
        assert tok["ids"]["checked_by"] == "llama.cpp" and greedy["differ"] == 0, greedy
        assert greedy["same"] + greedy["near_tie"] == 4 and cpp["max_rel_logit_diff"] < cpp["logit_tolerance"], cpp
    else:
        assert tok["ids"]["checked_by"] == "transformers (GGUF metadata)"
