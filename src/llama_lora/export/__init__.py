"""`llama-lora export RUN --format gguf --dtype f16|bf16|q8_0|f32 [--output DIR]`: a run as one GGUF file
for llama.cpp and Ollama, verified against the merged model before it appears.

DIR (default `<run>/gguf-<dtype>`, must not exist) receives `model.gguf`, an Ollama `Modelfile` and
`export.json`. The run's adapter is merged into a temporary folder (merge's own verification included),
converted with llama.cpp's converter (vendored, pinned: _vendor/llama_cpp/README.md), and the file is
read back: every tensor dequantized and compared with the merged weights, the vocabulary, special ids,
chat template and stop tokens compared with the run's tokenizer, and, where llama-cpp-python is
installed (and not skipped with --no-llama-cpp-check), the file loaded in llama.cpp: its tokenizer on sample
texts and its greedy continuations vs transformers' on the merged model, where a split at a near-tie (closer
than llama.cpp's measured logit error) counts as agreement. Everything is written into a temporary sibling
folder that is renamed to DIR only once all checks pass; on a mismatch the error names it and nothing is left.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llama_lora import artifacts, runs
from llama_lora.artifacts import RunDir
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError

log = logging.getLogger("llama_lora.export")

FORMATS = ("gguf",)
# What the converter writes itself (convert_hf_to_gguf --outtype), in bytes per weight for the space check.
DTYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
# llama.cpp's other quantizations are made from a 16-bit GGUF by its C++ `llama-quantize`; gguf-py can
# dequantize them but not quantize, so the converter does not offer them.
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1",
            "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
CONVERTER = Path(__file__).with_name("convert.py")
VENDORED_LLAMA = Path(__file__).resolve().parents[1] / "_vendor" / "llama_cpp" / "conversion" / "llama.py"


def supported_architectures() -> set[str]:
    """The `architectures` names the vendored converter module registers (read from its decorators)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(VENDORED_LLAMA.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register":
            names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names - {"LlavaForConditionalGeneration", "VoxtralForConditionalGeneration"}  # need vision/audio parts


def run(cfg: Config, fmt: str = "gguf", dtype: str = "f16", output: str | None = None, adapter: bool = False,
        llama_cpp_check: bool = True) -> Path:
    """Export cfg's run (or merged model) to `output` (default `<run>/gguf-<dtype>`), verified; returns `output`.

    Writes nothing but `output`, through its temporary sibling `.<name>.tmp-<pid>` (the run is only read, under
    a shared lock, none on a read-only mount). Beside `output` it removes only such temporary folders that a
    killed export left (dead pid, atomic_dir's marker inside); nothing else there is read, renamed or removed.
    `llama_cpp_check=False` skips running the file in llama.cpp (recorded in export.json as not verified).
    """
    t0 = time.time()
    dtype = dtype.lower()
    if fmt not in FORMATS:
        raise LlamaLoraError(f"Unknown export format '{fmt}'. Supported: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        hint = (f" '{dtype}' is one of llama.cpp's quantizations that only its C++ tool makes: export f16, then run "
                f"`llama-quantize model.gguf model-{dtype}.gguf {dtype.upper()}` from llama.cpp."
                if dtype in K_QUANTS else "")
        raise LlamaLoraError(f"Unknown --dtype '{dtype}'. The converter writes {', '.join(DTYPES)}.{hint}")
    target = runs.resolve(cfg.infer.run_dir, cfg.output_dir)
    if runs.is_run_dir(target) and not RunDir(target).is_finished():
        raise LlamaLoraError(runs.unfinished_message(RunDir(target)))
    out = Path(output).expanduser() if output else (
        target / f"gguf-{dtype}" if runs.is_run_dir(target) else target.parent / f"{target.name}-gguf-{dtype}")
    if out.exists():
        raise LlamaLoraError(f"The output {out} already exists. Choose another --output or remove it first; "
                             "export never overwrites.")
    model_dir = target if not runs.is_run_dir(target) else None
    if adapter:
        if model_dir is not None:
            raise LlamaLoraError(f"{target} is a merged model, with no adapter to export alone. Give --adapter a run "
                                 "directory.")
        adapter_config = artifacts.read_json(RunDir(target).adapter / "adapter_config.json")
        if adapter_config.get("use_dora"):
            raise LlamaLoraError("The run's adapter is DoRA, which llama.cpp's LoRA adapters cannot express (no "
                                 "magnitude vector). Export without --adapter: the merged model carries the DoRA update.")
    source = model_dir or _local(runs.base_model_of(target, cfg))
    arch = (json.loads((source / "config.json").read_text()).get("architectures") or ["?"])[0]
    if arch not in supported_architectures():
        raise LlamaLoraError(
            f"The base model's architecture {arch} cannot be exported: llama-lora ships llama.cpp's converter for "
            f"the Llama family (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM and "
            f"{len(supported_architectures()) - 3} more). Use llama.cpp's own "
            "convert_hf_to_gguf.py on `llama-lora merge`'s output for other architectures.")
    with runs.writing_into(cfg, "export", shared=True) as cfg:
        _check_output_place(out, _space_needed(target, cfg, dtype, model_dir), default=output is None)
        _remove_killed_temporaries(out)
        with artifacts.atomic_dir(out) as tmp:
            report = _export(cfg, tmp, dtype, model_dir, adapter, llama_cpp_check)
            report["seconds"] = round(time.time() - t0, 1)
            artifacts.write_json(tmp / "export.json", report)
            if out.exists() or out.is_symlink():  # made by someone else while this export ran: theirs, kept
                raise LlamaLoraError(f"{out} appeared while this export ran (another export or program made it). "
                                     "export never overwrites, so this export was discarded; choose another --output.")
    t = report["tensors"]
    print(f"exported: {out / 'model.gguf'}  ({dtype}, {t['compared']} tensors within tolerance, max relative error "
          f"{t['max_rel_error']:.3g}; tokenizer, chat template and stop tokens match; "
          f"{llama_cpp_summary(report['llama_cpp'])}). Ollama: cd {out} && ollama create NAME -f Modelfile")
    if report["merge"] and "max_abs_logit_diff_vs_quantized_base" in report["merge"]:
        from llama_lora import merge

        print(f"  {merge.quantized_base_note(report['merge'])}; the GGUF holds the base dequantized to "
              f"{report['merge']['dequantized_to']}; recorded in export.json (merge)")
    if report["adapter"]:
        print(f"adapter alone: {out / 'adapter.gguf'}  ({report['adapter']['compared']} LoRA tensors within tolerance; "
              "for llama.cpp --lora on the base model)")
    return out


def _local(base: str) -> Path:
    """The folder holding a base model: a path, or a hub id's snapshot in the local cache."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except Exception as e:
        raise LlamaLoraError(f"The run's base model {base} is not in the local hub cache; download it first.") from e


def _weights_bytes(model_path: Path) -> tuple[int, int]:
    """(number of weights, bytes on disk) of a safetensors checkpoint, from its headers."""
    n, size = 0, 0
    for f in Path(model_path).glob("*.safetensors"):
        size += f.stat().st_size
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                n += count
    return n, size


def llama_cpp_summary(cpp: dict) -> str:
    """What the summary line says about the llama.cpp check (export.json's `llama_cpp`)."""
    if cpp.get("skipped"):
        return "not verified in llama.cpp (--no-llama-cpp-check)"
    if not cpp.get("verified"):
        return f"llama.cpp check not run: {cpp['not_run']}"
    g = cpp["greedy"]
    parts = [f"{g['same']} same"] + ([f"{g['near_tie']} near-tie"] if g["near_tie"] else []) + (
        [f"{g['differ']} differ (reported, not required for this dtype)"] if g["differ"] else [])
    return f"llama.cpp greedy {', '.join(parts)} of {g['same'] + g['near_tie'] + g['differ']}"


def _space_needed(target: Path, cfg: Config, dtype: str, model_dir: Path | None) -> int:
    """Bytes the export needs beside its output: the temporary merged model (for a run) plus the GGUF."""
    n, size = _weights_bytes(model_dir or _local(runs.base_model_of(target, cfg)))
    return (0 if model_dir else size) + int(n * DTYPES[dtype]) + 64 * 2**20


def _check_output_place(out: Path, need: int, default: bool) -> None:
    """Before anything is written: the folder that will hold `out` (or its nearest existing parent) can be written
    and has room for `need` bytes. Refusals name --output: export writes nothing anywhere else."""
    place = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    try:
        artifacts.check_writable(place)
    except OSError as e:
        where = (f"its default output {out} is inside the run, which cannot be written ({e.strerror}). "
                 "The run itself is only read, so it may stay where it is: " if default else
                 f"{place} cannot be written ({e.strerror}), so ")
        raise LlamaLoraError(f"Cannot export to {out}: {where}choose a writable --output (export writes only "
                             "there, e.g. --output ~/models/NAME). Nothing was written.") from e
    free = shutil.disk_usage(place).free
    if free < need:
        raise LlamaLoraError(
            f"Not enough free disk space under {place}: {free / 2**20:.0f} MiB free, about {need / 2**20:.0f} MiB "
            "needed for the temporary merged model and the GGUF. Free some space or choose an --output on another "
            "disk. Nothing was written.")


def _remove_killed_temporaries(out: Path) -> list[str]:
    """Remove what a killed export into `out` left: `.<out.name>.tmp-<pid>` folders of dead processes that hold
    atomic_dir's marker (artifacts.TMP_MARKER). Nothing else beside `out` is looked at, renamed or removed (its
    folder may be the user's home or a shared models folder)."""
    removed = []
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")) if out.parent.is_dir() else []:
        pid = p.name.rpartition(".tmp-")[2]
        if (not pid.isdigit() or int(pid) == os.getpid() or artifacts.process_alive(int(pid)) or p.is_symlink() or not p.is_dir()
                or not (p / artifacts.TMP_MARKER).is_file()):
            continue
        shutil.rmtree(p)
        removed.append(p.name)
        log.info("Removed %s, the temporary folder of an export into %s that did not finish", p, out)
    return removed


def _export(cfg: Config, tmp: Path, dtype: str, model_dir: Path | None, adapter: bool = False,
            llama_cpp_check: bool = True) -> dict:
    from llama_lora import merge, model as model_lib
    from llama_lora.export import modelfile, verify

    merge_report = None
    if model_dir is None:  # a run: merged (and verified) by merge's own code, into the temporary folder
        model_dir = tmp / "merged"
        merge_report = merge.merge_to(cfg, RunDir(Path(cfg.infer.run_dir)), model_dir)
    gguf_path = tmp / "model.gguf"
    _convert(model_dir, gguf_path, dtype)

    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = model_lib.load_tokenizer(str(model_dir), cfg.model)
    fmt = runs.read_prompt_format(model_dir, cfg, tokenizer)
    gen_path = model_dir / "generation_config.json"
    gen_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    reader = gguf.GGUFReader(gguf_path)
    tensors, problems = verify.compare_tensors(reader, model_dir, dtype)
    prompts = [fmt.prompt(tokenizer, i, x) for i, x in merge.SAMPLE_PROMPTS]
    texts = verify.SAMPLE_TEXTS + prompts + ["".join(tokenizer.all_special_tokens)]
    tok_report, tok_problems = verify.compare_tokenizer(reader, tokenizer, gen_config, texts)
    problems += tok_problems
    del reader  # the memory map of the file
    if problems:
        _refuse(problems)
    greedy_problems = []
    if llama_cpp_check:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cpp, problems, greedy_problems = verify.llama_cpp_check(
            gguf_path, model, tokenizer, texts, prompts, tok_report["stop_token_ids"], dtype=dtype,
            work_dir=tmp)
        del model
    else:
        cpp = {"verified": False, "skipped": True, "not_run": "skipped with --no-llama-cpp-check"}
    if not cpp["verified"]:  # llama.cpp skipped, not installed or crashed: transformers' GGUF tokenizer instead
        tok_ids, more = verify.gguf_tokenizer_ids(gguf_path, tokenizer, texts)
        tok_report["ids"] = tok_ids
        problems += more
    else:
        tok_report["ids"] = {"checked_by": "llama.cpp", "texts": len(texts)}
    if problems:
        _refuse(problems)
    if greedy_problems:
        _refuse_greedy(greedy_problems, cpp)

    add_bos = cpp.get("add_bos", _llama_cpp_adds_bos(tok_report))
    template = modelfile.ollama_template(tokenizer, fmt, add_bos)
    params = modelfile.sampling_parameters(model_dir, json.loads((model_dir / "config.json").read_text()).get(
        "max_position_embeddings"))
    (tmp / "Modelfile").write_text(modelfile.render(gguf_path.name, template, tok_report["stop_tokens"], params,
                                                    fmt.system_prompt))
    size = gguf_path.stat().st_size
    adapter_report = None
    if adapter:  # the LoRA alone, for llama.cpp's --lora / Ollama's ADAPTER on the base model
        run_dir = RunDir(Path(cfg.infer.run_dir))
        base_dir = _local(runs.base_model_of(run_dir.path, cfg))
        _convert(base_dir, tmp / "adapter.gguf", dtype, lora=run_dir.adapter)
        adapter_report, problems = verify.compare_lora(gguf.GGUFReader(tmp / "adapter.gguf"), run_dir.adapter,
                                                       base_dir, dtype)
        if problems:
            _refuse(problems)
    shutil.rmtree(tmp / "merged", ignore_errors=True)  # only the GGUF is the product
    return {"format": "gguf", "dtype": dtype, "file": gguf_path.name, "bytes": size,
            "source": str(cfg.infer.run_dir), "converter": "llama.cpp convert_hf_to_gguf @0c1e570 (llama-cpp-python 0.3.36)",
            "merge": merge_report, "tensors": tensors, "adapter": adapter_report, "tokenizer": tok_report, "llama_cpp": cpp,
            "modelfile": {"template": "derived" if template is not None else "gguf chat_template (not expressible)",
                          "stops": tok_report["stop_tokens"], "parameters": params}}


def _llama_cpp_adds_bos(tok: dict) -> bool:
    """Whether llama.cpp puts BOS before a prompt itself: the GGUF's flag, else its default for the vocabulary
    (llama-vocab.cpp: SentencePiece and Llama-3's BPE yes, GPT-2's no). Asked of llama.cpp where installed."""
    if tok["add_bos_token"] is not None:
        return bool(tok["add_bos_token"])
    return tok["model"] == "llama" or tok["pre_tokenizer"] in ("llama3", "llama-v3", "llama-bpe")


def _refuse(problems: list[str]) -> None:
    """A mismatch in the file itself (tensors, vocabulary, special tokens, llama.cpp's tokenization)."""
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise LlamaLoraError(f"Export verification failed: {shown}. Nothing was written. The converter and the "
                         "merged model disagree; run with --debug and report it with the run's config.yaml.")


def _refuse_greedy(problems: list[str], cpp: dict) -> None:
    """llama.cpp decodes a verified file differently from transformers, by a clear margin (not a near-tie)."""
    g = cpp["greedy"]
    raise LlamaLoraError(
        f"Export verification failed: llama.cpp {cpp['version']} runs the file differently from transformers on "
        f"{g['differ']} of {g['same'] + g['near_tie'] + g['differ']} sample prompts; {problems[0]}. The "
        "file's tensors, vocabulary, special tokens, chat template and llama.cpp's tokenization all match the merged "
        "model (checked), so what differs is how llama.cpp computes it: its build (try another llama-cpp-python "
        "version) or a model setting llama.cpp reads differently. Nothing was written. To write the file without "
        "this check, pass --no-llama-cpp-check (export.json then records it as not verified in llama.cpp).")


def _convert(model_dir: Path, gguf_path: Path, dtype: str, lora: Path | None = None) -> None:
    """convert_hf_to_gguf (or, with `lora`, convert_lora_to_gguf on that adapter) in a child process: its
    gguf-py must not meet PyPI's gguf in this interpreter."""
    extra = ["--lora", str(lora)] if lora else []
    proc = subprocess.run([sys.executable, str(CONVERTER), *extra, str(model_dir), str(gguf_path), "--outtype", dtype],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not gguf_path.is_file():
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and not ln.startswith(("hf-to-gguf: **", " "))]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        why = (" The tokenizer's pre-tokenizer is neither one llama.cpp knows by hash nor GPT-2's or Llama-3's "
               "byte-level regex, so llama.cpp would split text differently than the run did; it cannot be exported."
               if "pre-tokenizer was not recognized" in last else "")
        log.debug("converter output:\n%s", proc.stderr)
        raise LlamaLoraError(f"llama.cpp's converter failed on {model_dir}: {last}.{why} Nothing was written.")
