"""`llama-lora export` through the real CLI on the shared quickstart run: the GGUF read back and compared
with the run merged here, the Modelfile's contents, bad input refused with one paragraph; and, where
llama-cpp-python is installed, the file run in llama.cpp (same greedy tokens as transformers, a near-tie
counted as agreement). On tiny runs: nothing beside --output or in the run is touched but export's own
temporary folder, a read-only run exports to a writable --output, a read-only --output is named, and a
llama.cpp check that is skipped or crashes is reported as not run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_lora import artifacts, merge
from llama_lora.data import PromptFormat
from llama_lora.export import verify
from tests.helpers import (
    can_mount_read_only, dead_pid, error_paragraph, make_run, run_cli, run_cli_read_only, tree_state,
)

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not "
                                     "installed (pip install 'llama-lora[llamacpp]'): the GGUF is not run in llama.cpp")


@pytest.fixture(scope="module")
def exported(quickstart_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "qs-f16"
    proc = run_cli("export", str(quickstart_run), "--format", "gguf", "--dtype", "f16", "--output", str(out), "--adapter")
    return out, proc


def test_export_round_trip(exported, quickstart_run):
    out, proc = exported
    assert f"exported: {out / 'model.gguf'}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "export.json", "model.gguf"]
    assert not (quickstart_run / "merged").exists() and not (quickstart_run / "gguf-f16").exists()
    report = json.loads((out / "export.json").read_text())
    assert report["dtype"] == "f16" and report["tensors"]["compared"] == 20 and report["tensors"]["max_rel_error"] < 1e-3

    # Independent reference: the run merged here with PEFT, compared with the file as llama.cpp reads it.
    base = AutoModelForCausalLM.from_pretrained(json.loads((quickstart_run / "run.json").read_text())["base_model"])
    merged = PeftModel.from_pretrained(base, quickstart_run / "adapter").merge_and_unload().state_dict()
    reader = gguf.GGUFReader(out / "model.gguf")
    t = {rt.name: rt for rt in reader.tensors}
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    for gname, hname in [("token_embd.weight", "model.embed_tokens.weight"),
                         ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                         ("output_norm.weight", "model.norm.weight")]:
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t[gname].data, t[gname].tensor_type), dtype=np.float32))
        assert torch.allclose(got, merged[hname], atol=1e-3 * float(merged[hname].abs().max())), gname

    # Tokenizer and stops as stored: the run's vocabulary, eos = <|eot_id|>, its chat template.
    tok = AutoTokenizer.from_pretrained(quickstart_run / "tokenizer")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids("<|eot_id|>")
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert report["tokenizer"]["stop_tokens"] == ["<|end_of_text|>", "<|eot_id|>"]

    # The adapter alone: its B matrix of q_proj in llama.cpp's row order, alpha as trained.
    lora = {rt.name: rt for rt in gguf.GGUFReader(out / "adapter.gguf").tensors}
    b = lora["blk.0.attn_q.weight.lora_b"]
    got = torch.from_numpy(np.array(gguf.quants.dequantize(b.data, b.tensor_type), dtype=np.float32))
    want = load_file(quickstart_run / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    want = want.reshape(4, 2, -1, want.shape[1]).swapaxes(1, 2).reshape(want.shape)  # 4 heads, rotary halves interleaved
    assert torch.allclose(got, want, atol=1e-3 * float(want.abs().max()))
    assert report["adapter"]["compared"] == len(lora) and report["adapter"]["lora_alpha"] == 32.0

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert ('TEMPLATE """<|begin_of_text|>{{ range .Messages }}{{ if eq .Role "system" }}'
            "<|start_header_id|>system<|end_header_id|>\n\n{{ .Content }}<|eot_id|>") in modelfile
    assert modelfile.count('PARAMETER stop "<|eot_id|>"') == 1 and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    assert "PARAMETER temperature 0.0" in modelfile and "PARAMETER num_ctx 512" in modelfile


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_generates_what_transformers_generates(exported):
    report = json.loads((exported[0] / "export.json").read_text())
    cpp = report["llama_cpp"]
    assert cpp["verified"] and report["tokenizer"]["ids"]["checked_by"] == "llama.cpp", cpp
    greedy = cpp["greedy"]
    assert greedy["same"] + greedy["near_tie"] == 4 and greedy["differ"] == 0, greedy
    assert all(len(g["llama_cpp"]) > 1 for g in greedy["prompts"]), greedy["prompts"]
    assert 0 < cpp["max_rel_logit_diff"] < cpp["logit_tolerance"]  # measured on every prompt
    assert cpp["add_bos"] is False  # so the Modelfile's template writes <|begin_of_text|> itself
    assert f"llama.cpp greedy {greedy['same']} same" in exported[1].stdout


def test_export_bad_input_cli(quickstart_run, tmp_path):
    proc = run_cli("export", str(quickstart_run), "--dtype", "q4_k_m", "--output", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Unknown --dtype 'q4_k_m'" in error_paragraph(proc.stderr) and "llama-quantize" in proc.stderr
    (tmp_path / "exists").mkdir()
    proc = run_cli("export", str(quickstart_run), "--output", str(tmp_path / "exists"), check=False)
    assert proc.returncode == 2 and "already exists" in error_paragraph(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"] and not list((tmp_path / "exists").iterdir())


# ----------------------------------------------------------------------------------------------------
# What export may touch: its output, and its own temporary folder from a killed export into the same output.


def _foreign_entries(folder: Path, out_name: str) -> Path:
    """Entries beside an export's output that export did not write, most named as atomic_dir or write_text
    would name them for that output or others (a user's backups, another program's temporaries). Returns the
    one entry that is export's own: the marked temporary folder of a killed export into `out_name`."""
    pid = dead_pid()
    (folder / f".thesis.tmp-{pid}").mkdir()
    (folder / f".thesis.tmp-{pid}" / "c.txt").write_text("chapter 1")
    (folder / f".settings.old-{pid}").write_text("v1 settings")
    (folder / f".report.md.tmp-{pid}").write_text("editor backup")
    (folder / f".{out_name}.old-{pid}").mkdir()  # what atomic_dir sets aside: export never replaces, so not its
    (folder / f".{out_name}.old-{pid}" / "model.gguf").write_text("the user's previous model")
    (folder / f".{out_name}.tmp-{pid}").write_text("a file, as write_text leaves it: export writes none here")
    (folder / f".{out_name}.tmp-{pid + 1}").mkdir()  # the exact name, but no marker: not atomic_dir's
    (folder / f".{out_name}.tmp-{pid + 1}" / "data.txt").write_text("someone's")
    (folder / f".other.tmp-{pid}").mkdir()  # atomic_dir's, for another name
    (folder / f".other.tmp-{pid}" / artifacts.TMP_MARKER).touch()
    (folder / "notes.txt").write_text("mine")
    ours = folder / f".{out_name}.tmp-{pid + 2}"
    ours.mkdir()
    (ours / artifacts.TMP_MARKER).touch()
    (ours / "model.gguf").write_bytes(b"half a model")
    return ours


def _without(state: dict, *prefixes: str) -> dict:
    return {k: v for k, v in state.items() if not any(k == p or k.startswith(p + "/") for p in prefixes)}


def test_export_touches_nothing_beside_its_output_but_its_own_temporary(tmp_path, tiny_base):
    run = make_run(tmp_path / "runs", tiny_base)
    models = tmp_path / "models"
    models.mkdir()
    ours = _foreign_entries(models, "my-run-f16")
    before = tree_state(models)
    proc = run_cli("export", str(run), "--output", str(models / "my-run-f16"), "--no-llama-cpp-check")
    assert f"exported: {models / 'my-run-f16' / 'model.gguf'}" in proc.stdout
    assert _without(tree_state(models), "my-run-f16") == _without(before, ours.name)  # bytes and mtimes
    assert not ours.exists() and f"Removed {ours}" in proc.stderr  # the killed export's GBs, and said so
    assert sorted(p.name for p in (models / "my-run-f16").iterdir()) == ["Modelfile", "export.json", "model.gguf"]
    # the skipped check, as the summary line and export.json name it
    assert "not verified in llama.cpp (--no-llama-cpp-check)" in proc.stdout
    report = json.loads((models / "my-run-f16" / "export.json").read_text())
    assert report["llama_cpp"] == {"verified": False, "skipped": True, "not_run": "skipped with --no-llama-cpp-check"}


def test_export_into_the_run_touches_nothing_of_the_run_but_its_output(tmp_path, tiny_base):
    run = make_run(tmp_path, tiny_base)
    ours = _foreign_entries(run, "gguf-f16")
    before = tree_state(run)  # the run's own files too: export only reads them
    proc = run_cli("export", str(run), "--no-llama-cpp-check")
    assert f"exported: {run / 'gguf-f16' / 'model.gguf'}" in proc.stdout
    assert _without(tree_state(run), "gguf-f16") == _without(before, ours.name)
    assert not ours.exists() and (run / "gguf-f16" / "model.gguf").is_file()


def test_a_read_only_run_exports_to_a_writable_output(tmp_path, tiny_base):
    if not can_mount_read_only(tmp_path):
        pytest.skip("needs `unshare -rm` and bind mounts (a private mount namespace) to make a read-only folder")
    runs_dir = tmp_path / "ro-runs"  # the run and the folder around it (where its lock file would go)
    run = make_run(runs_dir, tiny_base)
    before = tree_state(runs_dir)
    out = tmp_path / "models" / "run-f16"
    proc = run_cli_read_only([runs_dir], "export", str(run), "--output", str(out), "--no-llama-cpp-check")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported: {out / 'model.gguf'}" in proc.stdout and (out / "model.gguf").is_file()
    assert tree_state(runs_dir) == before

    # A read-only --output is named as such, and so is the default output inside a read-only run.
    (tmp_path / "ro-models").mkdir()
    proc = run_cli_read_only([runs_dir, tmp_path / "ro-models"], "export", str(run), "--output",
                             str(tmp_path / "ro-models" / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = error_paragraph(proc.stderr)
    assert f"Cannot export to {tmp_path / 'ro-models' / 'x'}: {tmp_path / 'ro-models'} cannot be written " \
           "(Read-only file system), so choose a writable --output" in message, message
    assert "copy the run" not in message and "output_dir" not in message and "Loaded" not in proc.stderr
    proc = run_cli_read_only([runs_dir], "export", str(run))
    message = error_paragraph(proc.stderr)
    assert proc.returncode == 2 and f"default output {run / 'gguf-f16'} is inside the run" in message, message
    assert "choose a writable --output" in message and "copy the run" not in message
    assert tree_state(runs_dir) == before and not list((tmp_path / "ro-models").iterdir())


@needs_llama_cpp
def test_a_llama_cpp_crash_is_reported_as_a_check_not_run(tmp_path, tiny_base):
    # A llama_cpp that aborts on import (as a broken native build does on load): the child dies of SIGABRT.
    (tmp_path / "shadow" / "llama_cpp").mkdir(parents=True)
    (tmp_path / "shadow" / "llama_cpp" / "__init__.py").write_text("import os\nos.abort()\n")
    run = make_run(tmp_path, tiny_base)
    path = os.pathsep.join([str(tmp_path / "shadow"), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = run_cli("export", str(run), "--output", str(tmp_path / "out"), env={"PYTHONPATH": path})
    assert "llama.cpp check not run: llama.cpp crashed running the file (signal 6)" in proc.stdout, proc.stdout
    cpp = json.loads((tmp_path / "out" / "export.json").read_text())["llama_cpp"]
    assert cpp["verified"] is False and cpp["crashed"] == "signal 6", cpp
    assert not list((tmp_path / "out").glob(".llama-cpp-logits*"))


# ----------------------------------------------------------------------------------------------------
# A near-tie of greedy decoding: an export of a correct model that llama.cpp decodes one token differently.


def _make_near_tie(run: Path, base: Path) -> tuple[int, int]:
    """Give two tokens (in no sample text) embedding rows that make them the top two after the first
    sample prompt: in fp32 (transformers) b wins by ~1e-4, in the f16 GGUF the two rows round to values for
    which a wins (b's row is a's plus a few sub-ulp nudges). Returns (a, b). The embeddings are tied, so the
    rows are the output head's too; neither token is in any prompt, so nothing else changes."""
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    prompts = [PromptFormat("chat").prompt(tok, i, x) for i, x in merge.SAMPLE_PROMPTS]
    used = {i for t in [*verify.SAMPLE_TEXTS, *prompts, "".join(tok.all_special_tokens)]
            for i in tok(t, add_special_tokens=False).input_ids}
    a, b = [i for i in range(256) if i not in used][:2]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").merge_and_unload()
    ids = torch.tensor([tok(prompts[0], add_special_tokens=False).input_ids])
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[0, -1].double().numpy()  # after the final norm: what the head sees
        top = float(model(ids).logits[0, -1].max())

    def f16(x):
        return np.asarray(x, dtype=np.float16).astype(np.float64)

    def spacing(x):
        return float(np.spacing(np.float16(abs(x))))

    row_a = f16((top + 8) / (h @ h) * h)  # logit top + 8: far above every other token; exact in f16
    j = int(np.argmax(np.abs(h)))
    nudged = row_a.copy()
    nudged[j] += np.sign(h[j]) * 0.45 * spacing(row_a[j])  # raises b's fp32 logit; rounds back in f16
    best = None
    for k in set(range(len(h))) - {j}:
        row_b = nudged.copy()
        row_b[k] -= np.sign(h[k]) * 0.55 * spacing(row_a[k])  # lowers it by less in fp32; rounds one step in f16
        fp32_margin, f16_margin = (row_b - row_a) @ h, -(f16(row_b) - row_a) @ f16(h)
        if np.count_nonzero(f16(row_b) != row_a) == 1 and min(fp32_margin, f16_margin) > (best or (0,))[0]:
            best = (min(fp32_margin, f16_margin), row_b)
    assert best and best[0] > 1e-5, best
    weights = load_file(base / "model.safetensors")
    emb = weights["model.embed_tokens.weight"]
    emb[a], emb[b] = torch.from_numpy(row_a).float(), torch.from_numpy(best[1]).float()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return a, b


@needs_llama_cpp
def test_a_near_tie_of_greedy_decoding_is_agreement_and_recorded(tmp_path, tiny_base):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    run = make_run(tmp_path, base)
    a, b = _make_near_tie(run, base)
    proc = run_cli("export", str(run), "--dtype", "f16", "--output", str(tmp_path / "out"))
    cpp = json.loads((tmp_path / "out" / "export.json").read_text())["llama_cpp"]
    greedy = cpp["greedy"]
    # the prompts all end in the same assistant header, so the two tokens may lead after the others too
    assert greedy["near_tie"] >= 1 and greedy["differ"] == 0 and greedy["required"], greedy
    assert f"llama.cpp greedy {greedy['same']} same, {greedy['near_tie']} near-tie of 4" in proc.stdout, proc.stdout
    tie = greedy["prompts"][0]
    assert tie["verdict"] == "near_tie" and tie["split_step"] == 0, tie
    assert (tie["transformers"][0], tie["llama_cpp"][0]) == (b, a)
    assert (tie["transformers_token"], tie["llama_cpp_token"]) == (b, a)
    assert 0 < tie["gap"] == tie["top2_gap"] < tie["logit_error"] <= cpp["logit_tolerance"] * tie["logit_scale"], tie
