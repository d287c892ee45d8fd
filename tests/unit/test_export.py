"""`llama-lora export` in-process: GGUF tensors against the merged model (LoRA, DoRA, q8_0), a tampered file
refused with nothing left, bad input refused before anything is written, the Ollama template derivation,
and the converter glue's pre-tokenizer recognition. The CLI round trip is tests/integration/test_export.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llama_lora import artifacts, export
from llama_lora.data import PromptFormat
from llama_lora.embedded.tokenizer import build_tokenizer
from llama_lora.errors import LlamaLoraError
from llama_lora.export import convert, modelfile, verify
from llama_lora.runs import saved_config
from tests.helpers import make_run


def _cfg(target: Path):
    return saved_config(target, [], "export")


def _merged_reference(run: Path) -> dict[str, torch.Tensor]:
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "run.json").read_text())["base_model"])
    return PeftModel.from_pretrained(base, run / "adapter").merge_and_unload().state_dict()


@pytest.mark.parametrize("method,dtype", [("dora", "f16"), ("lora", "q8_0")])
def test_export_tensors_match_an_independent_merge(tmp_path, tiny_base, method, dtype):
    run = make_run(tmp_path, tiny_base, method)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    out = export.run(_cfg(run), dtype=dtype, output=str(tmp_path / "exp"))
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model.gguf"]
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # no merged/ left in the run
    report = json.loads((out / "export.json").read_text())
    assert report["merge"]["method"] == method.replace("lora", "LoRA").replace("dora", "DoRA")
    # Read back here, with our own merge as the reference: q_proj in llama.cpp's row order, others as is.
    ref = _merged_reference(run)
    reader = gguf.GGUFReader(out / "model.gguf")
    t = {rt.name: torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32))
         for rt in reader.tensors}
    assert reader.tensors[2].tensor_type.name.lower() in ("f16", "q8_0", "f32")
    q = ref["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(t["blk.0.attn_q.weight"], q, atol=1e-2)  # stored permuted...
    assert torch.allclose(t["blk.0.attn_q.weight"], verify._permute(q, 4), atol=2e-2 * float(q.abs().max()))
    v = ref["model.layers.0.self_attn.v_proj.weight"]
    assert torch.allclose(t["blk.0.attn_v.weight"], v, atol=1e-2 * float(v.abs().max()))
    assert report["tensors"]["compared"] == len(t) == 20 and report["tokenizer"]["chat_template_equal"]


def test_a_tampered_tensor_is_refused_and_nothing_is_left(tmp_path, tiny_base, monkeypatch):
    run = make_run(tmp_path, tiny_base, "lora")
    real = export._convert

    def convert_then_corrupt(model_dir, gguf_path, dtype):
        real(model_dir, gguf_path, dtype)
        rt = next(t for t in gguf.GGUFReader(gguf_path).tensors if t.name == "blk.1.ffn_up.weight")
        data = np.memmap(gguf_path, dtype=np.float16, mode="r+", offset=rt.data_offset, shape=(int(rt.n_elements),))
        data[:5] += np.float16(0.5)  # what a converter bug or a disk error would do
        data.flush()

    monkeypatch.setattr(export, "_convert", convert_then_corrupt)
    with pytest.raises(LlamaLoraError, match=r"Export verification failed: tensor blk\.1\.ffn_up\.weight .*up_proj"):
        export.run(_cfg(run), dtype="f16", output=str(tmp_path / "exp"))
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.tmp-*"))


def test_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_base, monkeypatch):
    run = make_run(tmp_path, tiny_base, "lora")
    cfg = _cfg(run)
    cases = [
        (dict(dtype="q4_k_m"), r"Unknown --dtype 'q4_k_m'.*llama-quantize"),
        (dict(dtype="int3"), r"Unknown --dtype 'int3'. The converter writes f32, f16, bf16, q8_0"),
        (dict(fmt="onnx"), r"Unknown export format 'onnx'"),
    ]
    (tmp_path / "taken").mkdir()
    cases.append((dict(output=str(tmp_path / "taken")), r"already exists.*never overwrites"))
    for kwargs, match in cases:
        with pytest.raises(LlamaLoraError, match=match):
            export.run(cfg, **kwargs)
    # DoRA has no GGUF LoRA form; a merged model has no adapter.
    with pytest.raises(LlamaLoraError, match="adapter is DoRA"):
        export.run(_cfg(make_run(tmp_path / "d", tiny_base, "dora")), adapter=True, output=str(tmp_path / "e"))
    # A run whose training has not finished.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "run.json").write_text(json.dumps({"status": "interrupted", "base_model": str(tiny_base)}))
    with pytest.raises(LlamaLoraError, match=r"whose training did not finish \(interrupted\)"):
        export.run(_cfg(unfinished), output=str(tmp_path / "a"))
    # A base the converter has no module for.
    other = tmp_path / "qwen"
    shutil.copytree(tiny_base, other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(conf | {"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(LlamaLoraError, match=r"architecture Qwen2ForCausalLM cannot be exported"):
        export.run(saved_config(other, [], "export"), output=str(tmp_path / "b"))
    # Too little disk space, found before writing.
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 2**20))
    with pytest.raises(LlamaLoraError, match=r"Not enough free disk space"):
        export.run(cfg, output=str(tmp_path / "c"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "d", "qwen", "run-lora-float32", "taken", "unfinished"]
    assert not (run / "gguf-f16").exists()


def test_ollama_template_rebuilds_the_chat_template():
    tok = build_tokenizer()
    p = modelfile._role_pieces(tok)
    assert p["bos"] == "<|begin_of_text|>" and p["gen"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert p["user_pre"] == "<|start_header_id|>user<|end_header_id|>\n\n" and p["user_suf"] == "<|eot_id|>"
    template = modelfile.ollama_template(tok, PromptFormat("chat"), add_bos=False)
    assert template.startswith("<|begin_of_text|>{{ range .Messages }}") and "{{-" not in template
    assert modelfile.ollama_template(tok, PromptFormat("chat"), add_bos=True).startswith("{{ range .Messages }}")
    # Alpaca runs: the instruction goes where the template put it; the response follows.
    alpaca = modelfile.ollama_template(tok, PromptFormat("alpaca"), add_bos=True)
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}" in alpaca
    # A template that is not prefix + content + suffix per role (a default system prompt unless one is
    # given) gets no TEMPLATE line.
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}You are helpful.\n{% endif %}"
                         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert modelfile._role_pieces(tok) is None
    text = modelfile.render("model.gguf", None, ["<|eot_id|>"], {"temperature": 0.0}, "Be brief.")
    assert 'TEMPLATE """' not in text and 'PARAMETER stop "<|eot_id|>"' in text and 'SYSTEM """Be brief."""' in text


def test_sampling_parameters_follow_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.1}))
    assert modelfile.sampling_parameters(tmp_path, 8192) == {"temperature": 0.6, "top_p": 0.9,
                                                             "repeat_penalty": 1.1, "num_ctx": 8192}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert modelfile.sampling_parameters(tmp_path, None) == {"temperature": 0.0}


def test_pre_tokenizer_is_recognised_by_structure_only_for_the_two_known_regexes(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    embedded = json.loads((tmp_path / "tokenizer.json").read_text())
    assert convert.pre_tokenizer_by_structure(embedded) == "gpt-2"
    llama3 = json.loads(json.dumps(embedded))
    llama3["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": convert.LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    llama3["model"]["ignore_merges"] = True
    assert convert.pre_tokenizer_by_structure(llama3) == "llama-bpe"
    llama3["model"]["ignore_merges"] = False  # llama.cpp's llama-bpe always ignores merges for whole words
    assert convert.pre_tokenizer_by_structure(llama3) is None
    embedded["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    assert convert.pre_tokenizer_by_structure(embedded) is None


def test_overrides_that_cannot_apply_to_a_saved_run_are_refused(tmp_path, tiny_base):
    run = make_run(tmp_path, tiny_base, "lora")
    with pytest.raises(LlamaLoraError, match="cannot apply to the saved run.*`export` accepts"):
        saved_config(run, ["peft.r=8"], "export")


def _rows(*tops: tuple[int, float, int, float], vocab: int = 8) -> np.ndarray:
    """Logit rows, one per step: each gives token a the logit la and token b the logit lb, the rest -5."""
    out = np.full((len(tops), vocab), -5.0, dtype=np.float32)
    for row, (a, la, b, lb) in zip(out, tops):
        row[a], row[b] = la, lb
    return out


def test_greedy_split_at_a_near_tie_counts_as_agreement_and_a_clear_split_does_not():
    # transformers: tokens 3, 4, 5; its step-1 logits give 4 only 0.01 more than 6
    ref = [3, 4, 5]
    ref_logits = _rows((3, 9.0, 1, 2.0), (4, 7.01, 6, 7.0), (5, 8.0, 2, 1.0))
    # llama.cpp: the same first step, 0.02 off (its measured error on this prompt), then 6 where transformers has 4
    got = [3, 6, 0]
    got_logits = _rows((3, 9.02, 1, 2.0), (6, 7.02, 4, 7.0), (0, 8.0, 2, 1.0))
    r = verify.compare_greedy(ref, ref_logits, got, got_logits, prompt_error=0.005)
    assert r["verdict"] == "near_tie" and r["split_step"] == 1, r
    assert r["transformers_token"] == 4 and r["llama_cpp_token"] == 6
    assert r["gap"] == pytest.approx(0.01, abs=1e-5) and r["top2_gap"] == pytest.approx(0.01, abs=1e-5)
    assert r["logit_error"] == pytest.approx(0.02, abs=1e-5)  # step 0, shared by both; not the split step itself
    # the error measured on the prompt's own positions counts as well
    r = verify.compare_greedy(ref, ref_logits, got, _rows((3, 9.0, 1, 2.0), (6, 7.02, 4, 7.0), (0, 8.0, 2, 1.0)),
                              prompt_error=0.015)
    assert r["verdict"] == "near_tie" and r["logit_error"] == pytest.approx(0.015)
    # the same split with a clear gap: transformers' 4 is 0.5 above 6, beyond any error measured on the prompt
    clear = _rows((3, 9.0, 1, 2.0), (4, 7.5, 6, 7.0), (5, 8.0, 2, 1.0))
    r = verify.compare_greedy(ref, clear, got, got_logits, prompt_error=0.005)
    assert r["verdict"] == "differ" and r["gap"] == pytest.approx(0.5) and r["logit_error"] < r["gap"]
    # llama.cpp chose transformers' third token: judged by that token's own logit, not the top-2 gap
    third = _rows((3, 9.0, 1, 2.0), (4, 7.01, 7, 7.005), (5, 8.0, 2, 1.0))
    third[1, 6] = 6.0
    r = verify.compare_greedy(ref, third, got, got_logits, prompt_error=0.005)
    assert r["verdict"] == "differ" and r["gap"] == pytest.approx(1.01)
    assert r["top2_gap"] == pytest.approx(0.005, abs=1e-5)
    # the same tokens; and a continuation that stops early (no token to compare at the split)
    assert verify.compare_greedy(ref, ref_logits, ref, ref_logits, prompt_error=0.0)["verdict"] == "same"
    r = verify.compare_greedy(ref, ref_logits, ref[:2], ref_logits[:2], prompt_error=0.0)
    assert r["verdict"] == "differ" and r["split_step"] == 2 and r["gap"] is None


def test_the_summary_line_names_a_llama_cpp_check_that_did_not_run():
    greedy = {"same": 3, "near_tie": 1, "differ": 0}
    assert export.llama_cpp_summary({"verified": True, "greedy": greedy}) == "llama.cpp greedy 3 same, 1 near-tie of 4"
    assert export.llama_cpp_summary({"verified": False, "skipped": True, "not_run": "skipped with --no-llama-cpp-check"}
                                    ) == "not verified in llama.cpp (--no-llama-cpp-check)"
    assert export.llama_cpp_summary({"verified": False, "available": False, "not_run": "llama-cpp-python is not "
                                     "installed"}) == "llama.cpp check not run: llama-cpp-python is not installed"


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed: the GGUF is not run in llama.cpp")
def test_a_clear_greedy_split_is_refused_without_blaming_the_converter(tmp_path, tiny_base, monkeypatch):
    """A GGUF whose tensors and tokenizer are right but one model setting is not (RMSNorm's epsilon raised from
    1e-6 to 1e4, which none of the read-back checks covers): llama.cpp computes another model, by far more than
    any rounding, so its greedy decoding splits with a clear gap and the export is refused, naming llama.cpp."""
    run = make_run(tmp_path, tiny_base, "lora")
    real = export._convert

    def convert_then_change_epsilon(model_dir, gguf_path, dtype):
        real(model_dir, gguf_path, dtype)
        reader = gguf.GGUFReader(gguf_path, "r+")
        field = reader.fields["llama.attention.layer_norm_rms_epsilon"]
        field.parts[field.data[0]][0] = 1e4
        reader.data.flush()

    monkeypatch.setattr(export, "_convert", convert_then_change_epsilon)
    with pytest.raises(LlamaLoraError) as e:
        export.run(_cfg(run), dtype="f16", output=str(tmp_path / "exp"))
    message = str(e.value)
    assert "llama.cpp 0.3" in message and "runs the file differently from transformers" in message, message
    assert "not a rounding near-tie" in message or "rounding stays within" in message, message
    assert "--no-llama-cpp-check" in message and "report it" not in message and "converter" not in message
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp.tmp-*"))
