"""Read an exported GGUF back and compare it with the merged model it came from.

Reading uses PyPI's `gguf` (GGUFReader, quants.dequantize), not the vendored writer's copy, so a
writer bug is not mirrored by the reader. Each check returns a dict for export.json and a list of
mismatches (empty: passed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("llama_lora.export")

# Largest |gguf - merged| per tensor, relative to the tensor's largest |value|: half a unit in the last
# place of the format (f16: 11 significant bits, bf16: 8) with a little slack; Q8_0 stores each block of
# 32 as int8 times a per-block f16 scale, an error of at most half a step (scale/2 <= max/254) per value.
REL_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 5e-3}
# Largest llama.cpp-vs-transformers logit difference, relative to the prompt's largest |logit|, that a greedy
# split may be put down to (a near-tie: compare_greedy). llama.cpp rounds more than the weights: its KV cache
# is f16, a CPU matmul with f16 weights rounds the activations to f16, Q8_0's to 8 bits. Measured on the
# embedded model's runs: f32/f16 0.13-0.25%, bf16 1.3-1.7%, q8_0 3.0-5.4%; a file that llama.cpp computes as
# another model (a wrong norm epsilon or RoPE base) is off by tens of percent. The bounds leave room for
# deeper models.
LOGIT_TOLERANCE = {"f32": 0.05, "f16": 0.05, "bf16": 0.1, "q8_0": 0.25}
# Tensors the converter computes rather than copies (Llama-3.1 RoPE scaling factors): reported, not compared.
GENERATED = ("rope_freqs.weight",)

# Tokenizer samples: plain text, digits (Llama-3 splits them in threes), whitespace runs, non-ASCII,
# emoji, contractions, and special tokens written out.
SAMPLE_TEXTS = [
    "Hello world",
    "  leading spaces, 3333 digits and 3.14159",
    "héllo wörld — naïve café 🦙🚀 我想在apple工作",
    "I've been told he's there, 'RE you sure?\n\n\tTabs\r\nand newlines   ",
]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: it stores each head's rotary halves interleaved (GGML's RoPE pairs adjacent
    dims, HF's pairs dim i with i + d/2), the same reshape as convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _merged_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def compare_tensors(reader, model_dir: Path, dtype: str) -> tuple[dict, list[str]]:
    import gguf

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hf = _merged_tensors(model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    expected = {}
    for name, t in hf.items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            continue  # reported below as not exported
        if name.endswith("q_proj.weight"):
            t = _permute(t, n_head)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, n_kv)
        expected[gname] = (name, t)
    problems, worst, per_type = [], 0.0, {}
    seen = set()
    for rt in reader.tensors:
        if rt.name in GENERATED:
            continue
        if rt.name not in expected:
            problems.append(f"tensor {rt.name} has no counterpart in the merged model")
            continue
        hf_name, want = expected[rt.name]
        seen.add(rt.name)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32))
        want = want.float()
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"tensor {rt.name} ({hf_name}) has shape {tuple(got.shape)}, the merged model {tuple(want.shape)}")
            continue
        scale = float(want.abs().max()) or 1.0
        err = float((got - want).abs().max()) / scale
        kind = rt.tensor_type.name.lower()
        tol = REL_TOLERANCE.get(kind, REL_TOLERANCE[dtype])
        per_type[kind] = per_type.get(kind, 0) + 1
        worst = max(worst, err)
        if not err <= tol:
            problems.append(f"tensor {rt.name} ({hf_name}, {kind}) differs from the merged model by {err:.3g} of its "
                            f"largest value (tolerance {tol:g})")
    tied = cfg.get("tie_word_embeddings", False)
    for gname, (hf_name, _) in expected.items():
        if gname not in seen and not (tied and gname == "output"):
            problems.append(f"the merged model's {hf_name} is missing from the GGUF")
    not_mapped = sorted(n for n in hf if names.get_name(n, try_suffixes=(".weight", ".bias")) is None)
    if tied and "lm_head.weight" in not_mapped:
        not_mapped.remove("lm_head.weight")
    problems += [f"the merged model's {n} has no GGUF name" for n in not_mapped]
    return {"compared": len(seen), "tensor_types": per_type, "max_rel_error": worst,
            "generated": [t.name for t in reader.tensors if t.name in GENERATED]}, problems


def compare_tokenizer(reader, tokenizer, gen_config: dict, texts: list[str]) -> tuple[dict, list[str]]:
    """Vocabulary, special ids, chat template and stop tokens as stored in the GGUF metadata."""
    problems = []
    tokens = field(reader, "tokenizer.ggml.tokens", [])
    types = field(reader, "tokenizer.ggml.token_type", [])
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if len(tokens) < len(tokenizer):
        problems.append(f"the GGUF vocabulary has {len(tokens)} tokens, the run's tokenizer {len(tokenizer)}")
    wrong = [i for i, t in enumerate(vocab) if i < len(tokens) and tokens[i] != t]
    if wrong:
        problems.append(f"{len(wrong)} token strings differ from the run's tokenizer (first: id {wrong[0]}: "
                        f"{tokens[wrong[0]]!r} vs {vocab[wrong[0]]!r})")
    ids = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot")}
    for key, want in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("padding", tokenizer.pad_token_id)):
        if want is not None and ids[key] is not None and int(ids[key]) != want:
            problems.append(f"{key} token id is {ids[key]} in the GGUF, {want} in the run's tokenizer")
    if tokenizer.eos_token_id is not None and ids["eos"] is None:
        problems.append("the GGUF has no eos token id")
    template = field(reader, "tokenizer.chat_template")
    if (tokenizer.chat_template or None) != (template or None):
        problems.append("the chat template differs from the run's tokenizer's")
    eos = gen_config.get("eos_token_id", tokenizer.eos_token_id)
    stop_ids = sorted({int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None})
    control = 3  # gguf.TokenType.CONTROL: llama.cpp never prints these and matches them as end-of-generation
    stops = []
    for i in stop_ids:
        if i >= len(tokens) or int(types[i]) != control:
            problems.append(f"stop token id {i} is not a control token in the GGUF")
        else:
            stops.append(tokens[i])
    report = {"vocab_size": len(tokens), "model": field(reader, "tokenizer.ggml.model"),
              "pre_tokenizer": field(reader, "tokenizer.ggml.pre"),
              "special_ids": {k: (None if v is None else int(v)) for k, v in ids.items()},
              "add_bos_token": field(reader, "tokenizer.ggml.add_bos_token"),
              "chat_template_equal": (tokenizer.chat_template or None) == (template or None),
              "stop_token_ids": stop_ids, "stop_tokens": stops}
    return report, problems


def gguf_tokenizer_ids(gguf_path: Path, tokenizer, texts: list[str]) -> tuple[dict, list[str]]:
    """Ids from a tokenizer transformers builds out of the GGUF metadata alone, vs the run's tokenizer.
    Used where llama.cpp itself is not installed (then llama.cpp's own tokenizer is compared instead)."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(gguf_path)
    vocab = set(field(reader, "tokenizer.ggml.tokens", []))
    merges = field(reader, "tokenizer.ggml.merges", []) or []
    del reader
    if any("".join(m.split(" ", 1)) not in vocab for m in merges):
        # the converter glue's never-applying merge (a vocabulary without merges): transformers' builder
        # requires every merge's result to be a token, and the Rust side panics instead of raising
        return {"checked_by": None, "why_not": "transformers cannot rebuild a vocabulary without merges"}, []
    try:
        rebuilt = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except BaseException as e:  # noqa: BLE001  the Rust side panics (a BaseException) on unusual merges
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return {"checked_by": None, "why_not": f"transformers cannot rebuild it: {type(e).__name__}"}, []
    problems = []
    for text in texts:
        want = tokenizer(text, add_special_tokens=False).input_ids
        got = rebuilt(text, add_special_tokens=False).input_ids
        if got != want:
            problems.append(f"token ids for {text[:40]!r} differ: GGUF tokenizer {got[:12]}..., run's {want[:12]}...")
    return {"checked_by": "transformers (GGUF metadata)", "texts": len(texts)}, problems


def llama_cpp_check(gguf_path: Path, model, tokenizer, texts: list[str], prompts: list[str], stop_ids: list[int],
                    dtype: str, work_dir: Path, max_new_tokens: int = 16) -> tuple[dict, list[str], list[str]]:
    """Load the GGUF in llama.cpp (llama-cpp-python, in a child process) and compare it with transformers.

    Returns (report, tokenizer_problems, greedy_problems). Checked: llama.cpp's tokenizer on the samples and
    its end-of-generation set (tokenizer_problems, always fatal: the file would tokenize or stop differently),
    and greedy continuations of the prompts vs transformers' greedy decoding of `model` in fp32, each judged by
    `compare_greedy` (same, near_tie or differ; a near-tie only while the prompt's measured logit error is
    within LOGIT_TOLERANCE[dtype] of its logit scale). For f32/f16 a prompt that differs is a greedy_problem;
    for bf16/q8_0 (rounded weights) the counts are reported, not required. A check that could
    not run (llama-cpp-python missing, llama.cpp crashing or failing in its child) gives a report with
    `verified: false` and `not_run` saying why, and no problems: the file's tensors and tokenizer are verified
    without it. llama.cpp's logits are exchanged through .npy files in `work_dir`, removed afterwards.
    """
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        why = "llama-cpp-python is not installed (pip install 'llama-lora[llamacpp]')"
        return {"verified": False, "available": False, "not_run": why, "why_not": why}, [], []
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    logits_files = [Path(work_dir) / f".llama-cpp-logits-{i}.npy" for i in range(len(prompts))]
    job = {"gguf": str(gguf_path), "texts": texts, "prompt_ids": prompt_ids, "stop_ids": stop_ids,
           "max_new_tokens": max_new_tokens, "n_ctx": min(512, model.config.max_position_embeddings),
           "logits_files": [str(f) for f in logits_files]}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_child.py"))],
                              input=json.dumps(job), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            how = (f"signal {-proc.returncode}" if proc.returncode < 0
                   else (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
            log.warning("llama.cpp failed running the exported file (%s): the file is not verified in llama.cpp", how)
            return {"verified": False, "available": True, "crashed": how,
                    "not_run": f"llama.cpp crashed running the file ({how})"}, [], []
        res = json.loads(proc.stdout)
        got_logits = [np.load(f) for f in logits_files]
    finally:
        for f in logits_files:
            f.unlink(missing_ok=True)
    problems = []
    for text, got in zip(texts, res["tokens"]):
        want = tokenizer(text, add_special_tokens=False).input_ids
        if got != want:
            problems.append(f"llama.cpp tokenizes {text[:40]!r} as {got[:12]}..., the run's tokenizer as {want[:12]}...")
    not_eog = [i for i in stop_ids if not res["eog"][str(i)]]
    if not_eog:
        problems.append(f"llama.cpp does not stop at token ids {not_eog}")
    strict = dtype in ("f32", "f16")
    counts, results, greedy_problems = {"same": 0, "near_tie": 0, "differ": 0}, [], []
    for prompt, ids, got, cpp_logits in zip(prompts, prompt_ids, res["greedy"], got_logits):
        ref, ref_logits = _transformers_greedy(model, ids, max_new_tokens, stop_ids, tokenizer.pad_token_id)
        n = len(ids)
        scale = max(1.0, float(np.abs(ref_logits).max()))
        # llama.cpp's rows: row i holds the logits after token i, so rows n-1.. predict the continuation
        result = compare_greedy(ref, ref_logits[n - 1:], got, cpp_logits[n - 1:],
                                prompt_error=_max_abs_diff(ref_logits[:n - 1], cpp_logits[:n - 1]),
                                max_error=LOGIT_TOLERANCE[dtype] * scale)
        result["logit_scale"] = scale
        counts[result["verdict"]] += 1
        results.append({"prompt": prompt[-40:], "transformers": ref, "llama_cpp": got, **result})
        if strict and result["verdict"] == "differ":
            greedy_problems.append(_split_text(prompt, ref, got, result, LOGIT_TOLERANCE[dtype]))
    report = {"verified": True, "available": True, "version": res["version"], "add_bos": res["add_bos"],
              "tokenizer_texts": len(texts),
              "greedy": {**counts, "required": strict, "max_new_tokens": max_new_tokens, "prompts": results},
              "max_abs_logit_diff": max(r["logit_error"] for r in results) if results else None,
              "max_rel_logit_diff": max(r["logit_error"] / r["logit_scale"] for r in results) if results else None,
              "logit_tolerance": LOGIT_TOLERANCE[dtype]}
    return report, problems, greedy_problems


def _split_text(prompt: str, ref: list[int], got: list[int], result: dict, tolerance: float) -> str:
    where = (f"on the prompt ...{prompt[-30:]!r} llama.cpp's greedy decoding {got} splits from transformers' {ref} at "
             f"step {result['split_step']}")
    if result["gap"] is None:
        return f"{where}, where one of them has no token to compare"
    if result["gap"] <= result["logit_error"]:
        return (f"{where}, and its logits differ from transformers' by up to {result['logit_error']:.3g} on that "
                f"prompt "
                f"({100 * result['logit_error'] / result['logit_scale']:.3g}% of the logit scale "
                f"{result['logit_scale']:.3g}; rounding stays within {100 * tolerance:g}%)")
    return (f"{where}, where transformers' logit for its token is {result['gap']:.3g} above the one for llama.cpp's, "
            f"more than the largest llama.cpp-vs-transformers logit difference measured on that prompt "
            f"({result['logit_error']:.3g}): not a rounding near-tie")


def _transformers_greedy(model, ids: list[int], max_new_tokens: int, stop_ids: list[int],
                         pad_id) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of `ids` (stopping after the first stop id) and its fp32 logits: the
    prompt positions' (one forward pass) followed by each generated step's, rows aligned with llama.cpp's."""
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids or None, pad_token_id=pad_id,
                             output_logits=True, return_dict_in_generate=True)
        prompt_logits = model(prompt[:, :-1]).logits[0] if len(ids) > 1 else torch.zeros(0, out.logits[0].shape[-1])
        steps = torch.cat([step for step in out.logits]) if out.logits else torch.zeros(0, prompt_logits.shape[-1])
    return out.sequences[0, len(ids):].tolist(), torch.cat([prompt_logits, steps]).float().numpy()


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    rows, cols = min(len(a), len(b)), min(a.shape[-1], b.shape[-1])
    return float(np.abs(a[:rows, :cols] - b[:rows, :cols]).max()) if rows and cols else 0.0


def compare_greedy(ref: list[int], ref_logits: np.ndarray, got: list[int], got_logits: np.ndarray,
                   prompt_error: float, max_error: float = float("inf")) -> dict:
    """Judge llama.cpp's greedy continuation `got` against transformers' `ref` of the same prompt.

    ref_logits[j] / got_logits[j] are each side's logits before its token j (rows beyond a side's tokens are
    ignored), prompt_error the largest |llama.cpp - transformers| logit difference over the prompt's own
    positions. The verdict:
      - "same": the same tokens;
      - "near_tie": they split at step k, and transformers' logit for its own token exceeds its logit for
        llama.cpp's token by `gap` <= `logit_error`, the largest |llama.cpp - transformers| logit difference
        measured on this prompt at the positions whose context both share (the prompt's, and steps before k),
        itself at most `max_error` (an error beyond it is no rounding: it would excuse any split). A
        difference that large can reorder two tokens that close, so the split says nothing about the file;
        when llama.cpp's token is transformers' second, `gap` is transformers' top-2 gap at that step;
      - "differ": a split with a clear gap (gap > logit_error), at a logit error beyond `max_error`, or one
        that cannot be judged.
    The returned dict also holds split_step, gap, logit_error, top2_gap and both tokens at the split (None
    where they do not apply).
    """
    cols = min(ref_logits.shape[-1], got_logits.shape[-1]) if len(ref_logits) and len(got_logits) else 0
    k = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if k is None and len(ref) == len(got):
        error = max(prompt_error, _max_abs_diff(ref_logits[:len(ref)], got_logits[:len(got)]))
        return {"verdict": "same", "split_step": None, "gap": None, "top2_gap": None, "logit_error": error,
                "transformers_token": None, "llama_cpp_token": None}
    k = min(len(ref), len(got)) if k is None else k
    error = max(prompt_error, _max_abs_diff(ref_logits[:k], got_logits[:k]))
    a = ref[k] if k < len(ref) else None
    b = got[k] if k < len(got) else None
    gap = top2 = None
    if a is not None and b is not None and k < len(ref_logits) and max(a, b) < cols:
        row = ref_logits[k]
        gap = float(row[a] - row[b])
        top2 = float(np.diff(np.sort(row[:cols])[-2:])[0]) if cols > 1 else None
    verdict = "near_tie" if gap is not None and gap <= error <= max_error else "differ"
    return {"verdict": verdict, "split_step": k, "gap": gap, "top2_gap": top2, "logit_error": error,
            "transformers_token": a, "llama_cpp_token": b}


def compare_lora(reader, adapter_dir: Path, base_dir: Path, dtype: str) -> tuple[dict, list[str]]:
    """The GGUF LoRA's A/B matrices against the adapter's (B of q/k in llama.cpp's row order), and its alpha."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    expected = {}
    for name, t in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        module, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None or kind not in ("A.weight", "B.weight"):
            continue
        if kind == "B.weight" and module.endswith(("q_proj", "k_proj")):
            t = _permute(t, n_head if module.endswith("q_proj") else n_kv)
        expected[f"{gname}.lora_{kind[0].lower()}"] = (name, t.float())
    problems, worst, seen = [], 0.0, set()
    for rt in reader.tensors:
        if rt.name not in expected:
            problems.append(f"adapter tensor {rt.name} has no counterpart in the run's adapter")
            continue
        name, want = expected[rt.name]
        seen.add(rt.name)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32))
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"adapter tensor {rt.name} has shape {tuple(got.shape)}, the adapter's {name} {tuple(want.shape)}")
            continue
        err = float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)
        worst = max(worst, err)
        tol = REL_TOLERANCE.get(rt.tensor_type.name.lower(), REL_TOLERANCE[dtype])
        if not err <= tol:
            problems.append(f"adapter tensor {rt.name} differs from {name} by {err:.3g} (tolerance {tol:g})")
    problems += [f"the adapter's {expected[n][0]} is missing from the GGUF LoRA" for n in sorted(set(expected) - seen)]
    alpha = field(reader, "adapter.lora.alpha")
    if alpha is None or abs(float(alpha) - float(adapter_cfg["lora_alpha"])) > 1e-6:
        problems.append(f"the GGUF LoRA's alpha is {alpha}, the adapter's {adapter_cfg['lora_alpha']}")
    return {"file": "adapter.gguf", "compared": len(seen), "max_rel_error": worst, "lora_alpha": alpha,
            "rank": adapter_cfg.get("r")}, problems
