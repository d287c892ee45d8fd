"""Child-process driver around llama.cpp's vendored `convert_hf_to_gguf` (see _vendor/llama_cpp/README.md).

Run as a script, never imported: it puts the vendored converter and its own `gguf-py` first on sys.path,
which must not meet PyPI's `gguf` (an older release of the same package) in one interpreter.

    python convert.py MODEL_DIR OUTFILE --outtype f16|bf16|f32|q8_0
    python convert.py --lora ADAPTER_DIR BASE_DIR OUTFILE --outtype f16|...

This is convert_hf_to_gguf.py's main() for a local model without its CLI options, plus one piece of glue
(`_PreTokenizerByStructure`): the converter names a BPE pre-tokenizer only by hashing the ids it gives a
fixed text, which identifies published tokenizers; a tokenizer built here (the embedded default, a
Llama-3-style tokenizer with its own vocabulary) has a hash no list holds. Its pre-tokenizer is then
recognised from tokenizer.json's structure instead, for exactly the two regexes llama.cpp implements under
these names (GPT-2's, which HF's ByteLevel(use_regex=True) applies, and Llama-3's Split pattern); anything
else is still refused. The export verifies the choice: token ids read back from the GGUF must equal the
run tokenizer's (and llama.cpp's own tokenizer's, where llama-cpp-python is installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "_vendor" / "llama_cpp"

# Llama-3's pre-tokenizer regex, as tokenizer.json spells it (llama.cpp's 'llama-bpe'); GPT-2's ("gpt-2") is
# implicit in HF's ByteLevel(use_regex=True).
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def pre_tokenizer_by_structure(tokenizer_json: dict) -> str | None:
    """'gpt-2' or 'llama-bpe' when tokenizer.json's pre-tokenizer is exactly that regex + byte-level, else None."""
    if tokenizer_json.get("normalizer") is not None or tokenizer_json.get("model", {}).get("type") != "BPE":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    # llama.cpp's llama-bpe looks a whole pre-token up in the vocabulary before merging (ignore_merges),
    # its gpt-2 does not: the tokenizer must do the same.
    ignore_merges = bool(tokenizer_json["model"].get("ignore_merges"))
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return None if ignore_merges else "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space") and ignore_merges):
        return "llama-bpe"
    return None


def _with_structural_pre_tokenizer(model_class):
    class _PreTokenizerByStructure(model_class):
        model_arch = model_class.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                path = Path(self.dir_model) / "tokenizer.json"
                found = pre_tokenizer_by_structure(json.loads(path.read_text())) if path.is_file() else None
                if found is None:
                    raise
                logging.getLogger("hf-to-gguf").info("pre-tokenizer recognised by structure: %s", found)
                return found

        def set_vocab(self) -> None:
            super().set_vocab()
            # llama.cpp refuses a BPE vocabulary without a merges list ("cannot find tokenizer merges"), and
            # gguf-py cannot write an empty array. A tokenizer with no merges (the embedded one: one token per
            # byte) gets one merge that can never apply: two special tokens, which BPE never sees as symbols
            # (specials are split off before BPE, and merges only build on single characters upward).
            kv = self.gguf_writer.kv_data[0]
            if "tokenizer.ggml.merges" not in kv and getattr(kv.get("tokenizer.ggml.model"), "value", None) == "gpt2":
                path = Path(self.dir_model) / "tokenizer.json"
                specials = [t["content"] for t in json.loads(path.read_text()).get("added_tokens", [])
                            if t.get("special") and " " not in t["content"] and len(t["content"]) > 1]
                if len(specials) < 2:
                    raise NotImplementedError("a BPE tokenizer without merges and without two special tokens")
                self.gguf_writer.add_token_merges([f"{specials[0]} {specials[1]}"])

    return _PreTokenizerByStructure


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lora", help="adapter directory: convert the adapter alone (convert_lora_to_gguf)")
    p.add_argument("model_dir")
    p.add_argument("outfile")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    sys.path.insert(0, str(VENDOR))
    import torch
    import gguf  # the vendored gguf-py (VENDOR/gguf)

    from conversion.base import ModelBase, ModelType

    assert Path(gguf.__file__).resolve().is_relative_to(VENDOR), gguf.__file__
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[args.outtype]
    if args.lora:
        sys.argv = ["convert_lora_to_gguf.py", "--outfile", args.outfile, "--outtype", args.outtype,
                    "--base", args.model_dir, args.lora]
        import runpy

        runpy.run_path(str(VENDOR / "convert_lora_to_gguf.py"), run_name="__main__")
        return
    import importlib

    importlib.import_module("conversion.llama")  # registers the Llama family (the only vendored module)

    model_dir = Path(args.model_dir)
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(model_dir, False)
        arch = hparams["architectures"][0]
        model_class = _with_structural_pre_tokenizer(ModelBase._model_classes[ModelType.TEXT][arch])
        model = model_class(model_dir, ftype, Path(args.outfile), eager=False)
        model.write()


if __name__ == "__main__":
    main()
