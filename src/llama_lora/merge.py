"""`llama-lora merge [run_dir]`: fold a run's LoRA/DoRA adapter into the base weights -> `<run>/merged/`.

The result is a standalone model (safetensors, the base model's dtype, tokenizer and prompt.json
included) that plain `AutoModelForCausalLM.from_pretrained` loads. Before it becomes visible the
saved model is reloaded from disk and its logits on sample prompts are compared with base+adapter;
beyond a dtype-appropriate tolerance the merge is refused and nothing is left behind.

A run trained on a quantized base (model.quantization nf4/fp4/int8) is merged into its base dequantized
to the merge dtype: re-quantizing W + s B A would round most of the update away (the quality drop of
peft#2368, peft#2321). Two differences are printed and recorded in merge.json: the merged model vs the
dequantized base + adapter (the merge itself: verified against the tolerance) and vs the quantized base +
adapter, the model that was trained (what dequantizing changes: measured and shown, not a pass/fail).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llama_lora import artifacts, model as model_lib, runs
from llama_lora.artifacts import RunDir
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError

log = logging.getLogger("llama_lora.merge")

# Written last into <run>/merged: a `merged` folder without it is not ours to replace.
MARKER = "merge.json"

# Largest allowed |merged - unmerged| logit difference, relative to the largest |logit|. Merging only
# reorders floating-point sums in fp32 (W x + B A x vs (W + B A) x); in bf16/fp16 the merged weight is
# rounded to 8/11 mantissa bits, so differences of a few percent of the logit scale are expected.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

# Prompts the check runs on, rendered in the run's prompt format: short, varied, language and digits.
SAMPLE_PROMPTS = [
    ("Reverse the word.", "garden"),
    ("Add the two numbers.", "17 + 25"),
    ("Write a short sentence about the sea.", ""),
    ("Sort the characters.", "dbca"),
]


def base_dtype(base: str, cfg: Config) -> torch.dtype:
    """The dtype the base checkpoint is stored in (model.dtype overrides it when not 'auto')."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    try:
        conf = AutoConfig.from_pretrained(base, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        raise model_lib.hub_error(e, "model config", base) from e
    dtype = getattr(conf, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@torch.no_grad()
def sample_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False).logits.float().cpu()
    return out.masked_fill(batch["attention_mask"].unsqueeze(-1) == 0, 0.0)  # padding positions don't count


def run(cfg: Config) -> Path:
    """`llama-lora merge`: merge the run into `<run>/merged` (replacing only a `merged` that merge wrote)."""
    target = runs.resolve(cfg.infer.run_dir, cfg.output_dir)
    if not runs.is_run_dir(target):
        raise LlamaLoraError(f"{target} has no adapter to merge (it is already a standalone model). "
                             "Give merge a run directory with adapter/.")
    run_dir = RunDir(target)
    cfg = _base_quantization(cfg, target)
    artifacts.check_replaceable(run_dir.merged, MARKER)  # a `merged` of the user's own: refused before any work
    # One writer per run: a second merge (or a train overwrite / eval) of this run is refused while
    # this one loads, checks and writes <run>/merged.
    with run_dir.lock("merge"):
        report = merge_to(cfg, run_dir, run_dir.merged)
    _print_summary(report, run_dir.merged, "merge.json")
    return run_dir.merged


def _base_quantization(cfg: Config, target: Path) -> Config:
    """cfg with model.quantization set to what the run trained on (its config.yaml), the base merge loads.

    On merge, model.quantization names the output: 'none' (what merge writes) or the run's own value are
    accepted; asking for any other is asking for a quantized output, refused before anything is written.
    """
    from llama_lora.config.load import load_config_file

    cfg_file = target / "config.yaml"
    trained = load_config_file(cfg_file).model.quantization if cfg_file.is_file() else "none"
    asked = cfg.model.quantization
    if asked not in ("none", trained):
        raise LlamaLoraError(
            f"merge cannot write a quantized model (model.quantization={asked}): it writes the merged weights "
            f"in full precision (the run's base is {trained if trained != 'none' else 'not quantized'}), because "
            "quantizing W + s*B*A after merging rounds most of the adapter's update away. Merge without "
            "model.quantization, then load the merged model quantized where you use it (e.g. transformers' "
            "BitsAndBytesConfig), or keep the adapter separate on a quantized base. Nothing was written.")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantization": trained})})


def merge_to(cfg: Config, run_dir: RunDir, dest: Path) -> dict:
    """Merge the finished run `run_dir` into the folder `dest` and return the report written there as merge.json.

    The one merge that `llama-lora merge` (dest = `<run>/merged`) and `llama-lora export` (dest inside its own
    temporary folder) share. `dest` is written atomically (`artifacts.atomic_dir`): only a folder holding
    merge.json is replaced, and on a failed verification nothing is left. Only `dest` and its temporary
    sibling are written; the run is only read, so the caller decides how to lock it (merge: the run's writer
    lock, since `<run>/merged` is part of the run; export: a shared read lock). A run trained on a quantized
    base is merged into that base dequantized (the module docstring), both differences in the report.
    """
    t0 = time.time()
    cfg = _base_quantization(cfg, run_dir.path)
    cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"run_dir": str(run_dir.path)})})  # loaded
    dest = Path(dest)
    target = run_dir.path
    dtype = base_dtype(runs.base_model_of(target, cfg), cfg)
    runtime = runs.inference_runtime(cfg, dtype)  # merged in the base checkpoint's own dtype
    quantization = runtime.quantization
    loaded = runs.load(cfg, runtime=runtime)
    model, tokenizer, fmt, base = loaded.model, loaded.tokenizer, loaded.fmt, loaded.base_model
    tokenizer.padding_side = "right"
    texts = [fmt.prompt(tokenizer, i, x) for i, x in SAMPLE_PROMPTS]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    reference = sample_logits(model, batch)  # base + adapter, unmerged
    with model.disable_adapter():
        adapter_effect = float((sample_logits(model, batch) - reference).abs().max())
    method = "DoRA" if getattr(model.peft_config["default"], "use_dora", False) else "LoRA"
    tied_head = _adapts_tied_head(model)
    trained_reference = None
    if quantization != "none":
        # What was trained: the quantized base + adapter. Then the same adapter on the base dequantized to
        # the merge dtype, which is what gets merged (PEFT's own merge on a bitsandbytes layer re-quantizes).
        trained_reference = reference
        plain_base = model.unload()  # the adapter layers out, the bitsandbytes base as it was loaded
        del model
        n = model_lib.dequantize_model(plain_base, dtype)
        log.info("Dequantized %d %s layers of the base to %s for the merge", n, quantization,
                 str(dtype).removeprefix("torch."))
        model = runs.load_adapter(plain_base, run_dir.adapter)
        model.eval()
        reference = sample_logits(model, batch)  # dequantized base + adapter, unmerged

    merged = model.merge_and_unload()
    nbytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    artifacts.clean_stale(dest.parent, (dest.name,))  # a killed earlier merge's `.merged.tmp-PID` (GBs) goes first
    artifacts.check_free_space(dest.parent, nbytes + 100 * 2**20)
    with artifacts.atomic_dir(dest, MARKER) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "prompt.json", fmt.to_dict())
        del merged, model
        gc.collect()
        # Check what a user will load: the files just written, read back with plain transformers.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation=runtime.attn_implementation)
        reloaded.to(runtime.device).eval()
        got = sample_logits(reloaded, batch)
        diff = float((got - reference).abs().max())
        vs_trained = None if trained_reference is None else float((got - trained_reference).abs().max())
        scale = max(1.0, float(reference.abs().max()))
        tol = TOLERANCE.get(dtype, 6e-2) * scale
        finite = bool(torch.isfinite(reference).all() and torch.isfinite(got).all())
        report = {
            "method": method, "base_model": base, "dtype": str(dtype).removeprefix("torch."),
            "saved_dtype": str(reloaded.dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
            "tolerance": tol, "logit_scale": scale, "adapter_max_logit_change": adapter_effect,
            "sample_prompts": len(texts), "finite": finite, "seconds": round(time.time() - t0, 1),
            "quantization": quantization,
        }
        if vs_trained is not None:
            report |= {
                "dequantized_to": report["dtype"],
                # the merge itself: merged vs the dequantized base + adapter (verified, max_abs_logit_diff)
                "max_abs_logit_diff_vs_dequantized_base": diff,
                # what was trained: merged vs the quantized base + adapter (shown, not a pass/fail)
                "max_abs_logit_diff_vs_quantized_base": vs_trained,
                "relative_diff_vs_quantized_base": vs_trained / scale,
            }
        del reloaded
        if not finite or not diff <= tol or report["saved_dtype"] != report["dtype"]:
            raise LlamaLoraError(_failure(report, tied_head))
        artifacts.write_json(tmp / "merge.json", report)
    log.info("Merged %s adapter into %s (%s): max |logit diff| vs base+adapter %.3g (tolerance %.3g; the "
             "adapter itself moves logits by up to %.3g). Saved to %s", method, base, report["dtype"], diff, tol,
             adapter_effect, dest)
    if vs_trained is not None:
        log.info("The base was %s-quantized in training: the merged model (dequantized to %s) differs from the "
                 "trained quantized base + adapter by up to %.3g in logits (%.2g%% of the logit scale %.3g)",
                 quantization, report["dtype"], vs_trained, 100 * vs_trained / scale, scale)
    return report


def _print_summary(report: dict, dest: Path, recorded_in: str) -> None:
    """The result lines `merge` prints (stdout): where the model is, and for a quantized base both differences."""
    print(f"merged model: {dest}  ({report['method']}, {report['dtype']}, max |logit diff| "
          f"{report['max_abs_logit_diff']:.3g} <= tolerance {report['tolerance']:.3g})")
    if "max_abs_logit_diff_vs_quantized_base" in report:
        print("  " + quantized_base_note(report) + f"; recorded in {recorded_in}")


def quantized_base_note(report: dict) -> str:
    """One line on a merge from a quantized base (merge.json's figures): the merge itself, verified, and how far
    the merged model is from what was trained (the quantized base + adapter), measured."""
    vs_trained = report["max_abs_logit_diff_vs_quantized_base"]
    return (f"{report['quantization']} base: max |logit diff| merged vs dequantized base + adapter "
            f"{report['max_abs_logit_diff_vs_dequantized_base']:.3g} (the merge, verified); merged vs quantized base "
            f"+ adapter (what was trained) {vs_trained:.3g} ({100 * report['relative_diff_vs_quantized_base']:.2g}% "
            f"of the logit scale {report['logit_scale']:.3g})")


def _adapts_tied_head(model) -> bool:
    """An adapter on an output head that shares its weight with the input embeddings cannot be merged
    faithfully: merging changes the shared matrix, hence the embeddings too (peft#2777)."""
    base = model.get_base_model()
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    layer = getattr(head, "base_layer", head)
    return hasattr(head, "lora_A") and layer.weight is emb.weight


def _failure(report: dict, tied_head: bool) -> str:
    why = (
        "the logits are not finite (NaN/inf in the adapter or base weights)" if not report["finite"]
        else f"the saved model is {report['saved_dtype']}, not the base's {report['dtype']}"
        if report["saved_dtype"] != report["dtype"]
        else f"the merged model's logits differ from base+adapter by up to {report['max_abs_logit_diff']:.4g} "
        f"(tolerance {report['tolerance']:.3g} for {report['dtype']})"
    )
    hint = (
        " The adapter adapts lm_head, whose weight is tied to the input embeddings, so merging it changes "
        "the embeddings as well; train without lm_head in peft.target_modules or untie the embeddings."
        if tied_head else
        " The adapter files may be corrupted or inconsistent with the base model; check them or re-train."
    )
    return f"Merge verification failed: {why}. Nothing was written.{hint}"


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["merge", *sys.argv[1:]])
