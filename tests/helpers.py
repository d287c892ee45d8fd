"""Helpers shared by several test modules (append new ones; keep each self-contained)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------
# Tiny PEFT LoRA/DoRA models for the lean-step tests (tests/unit/test_lean_adapter.py, test_native.py).

LEAN_CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


def tiny_peft_model(dora: bool, dropout: float = 0.0, seed: int = 0, r: int = 4, lean=None,
                    dtype: torch.dtype = torch.float32, b_std: float = 0.2, magnitude_std: float = 0.2,
                    checkpointing: bool = False):
    """A 2-block Llama with an adapter on all 7 linear layers of each block, built by llama-lora's
    apply_adapter: PEFT's own layers, or LeanLinear with `lean` (a LeanPolicy). The same seed gives the
    same parameters either way; B (zero at init, which would hide any error in the adapter path) and
    DoRA's magnitude are randomised."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llama_lora.adapter import apply_adapter
    from llama_lora.config.schema import PeftConfig

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**LEAN_CFG), dtype=dtype)
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cfg = PeftConfig(r=r, alpha=2 * r, dropout=dropout, target_modules="all-linear",
                     method="dora" if dora else "lora")
    model = apply_adapter(base, cfg, lean=lean)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
            if "magnitude" in name and magnitude_std:
                p.mul_(1 + magnitude_std * torch.randn_like(p))
    return model


def bf16_lean_model(llama_cfg: dict, policy, dora: bool, r: int, b_std: float, device: str = "cpu"):
    """A bf16 Llama with fp32 LoRA/DoRA adapters on all 7 linear layers of its 2 blocks, built with PEFT's
    LoraConfig and, with a LeanPolicy, lean.register/attach directly (what apply_adapter does): the
    autocast comparison of the lean step with PEFT (tests/unit/test_lean_adapter.py on CPU,
    tests/gpu/test_cuda.py under CUDA). B is randomised (zero at init would hide adapter errors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llama_lora import lean

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**llama_cfg), dtype=torch.bfloat16,
                                            attn_implementation="sdpa").to(device)
    base.config.use_cache = False
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=dora)
    if policy is not None:
        lean.register(config)
    model = get_peft_model(base, config)
    if policy is not None:
        assert lean.attach(model, policy) == 14
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 adapters
    model.train()
    return model


def forward_backward(model, ids):
    """(logits, {name: grad}) of one forward and backward of a squared-logits loss."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------
# The CLI in a subprocess, as a user runs it; the checkout it runs in.

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 900,
            env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m llama_lora.cli ...` in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "llama_lora.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


# ----------------------------------------------------------------------------------------------------
# Run directories and folders, made without training.


def make_run(root: Path, base: Path, method: str = "lora", targets=("q_proj", "v_proj", "down_proj"),
             dtype=None, data: Path | None = None, alpha: float = 8) -> Path:
    """A finished run directory as train.py leaves it, with a random (clearly non-zero) adapter.

    `dtype` is the torch dtype of the base weights the adapter is made on (default torch.float32).
    A large `alpha` makes the adapter dominate the barely-trained base, so generations vary.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_lora.config.load import to_yaml
    from llama_lora.config.schema import Config

    dtype = torch.float32 if dtype is None else dtype
    run = root / f"run-{method}-{str(dtype)[6:]}"
    cfg = Config(model={"name_or_path": str(base)}, data={"source": str(data or root), "train_split": "train"},
                 peft={"method": method, "target_modules": list(targets)})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "run.json").write_text(json.dumps({"status": "finished", "base_model": str(base)}))
    (run / "prompt.json").write_text(json.dumps({"kind": "chat", "system_prompt": None}))
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=alpha, target_modules=list(targets),
                                                  use_dora=method == "dora", init_lora_weights=False))
    if method == "dora":  # a trained magnitude differs from the weight norm it starts at
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.data *= 1 + 0.3 * torch.rand_like(p)
    peft_model.save_pretrained(run / "adapter")
    return run


def file_tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path) with its text."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# validate's small data set and overrides (tests/unit/test_validate.py, tests/integration/test_cli_commands.py).


def write_validate_data(out: Path) -> Path:
    """80 embedded-task records (60 train, 10 validation, 10 test) as split files in `out`."""
    from llama_lora.embedded.data import generate_splits, write_jsonl

    write_jsonl(generate_splits(seed=3, n_train=60, n_validation=10, n_test=10), out)
    return out


def validate_overrides(base, data, *extra) -> list[str]:
    return [f"model.name_or_path={base}", f"data.source={data}", "data.train_split=train", *extra]


# ----------------------------------------------------------------------------------------------------
# The bad-input table: every expected mistake, run in-process by tests/unit/test_bad_input.py and, for
# BAD_INPUT_IN_SUBPROCESS, as real subprocesses by tests/integration/test_bad_input_cli.py.

BAD_INPUT_TRAIN = [  # a valid, tiny training command; each case overrides what it breaks
    "model.name_or_path={base}", "data.source={w}/good.jsonl", "data.train_split=train", "output_dir={w}/out",
    "training.max_steps=2", "training.micro_batch_size=2", "training.gradient_accumulation_steps=1",
    "data.max_eval_examples=2", "peft.r=4",
]


@dataclass
class BadInputCase:
    id: str
    argv: list[str]  # command, then its arguments; "{base}" and "{w}" are filled in
    expect: list[str]  # words the (whitespace-normalised) message must contain
    before_model: bool = False  # must fail before the base model's weights are loaded
    env: dict[str, str] | None = None  # environment for the case ("{w}" filled in)
    keeps: tuple[str, ...] = ()  # paths ("{w}" filled in) whose contents must be exactly as before


def _train(id: str, overrides: list[str], expect: list[str], before_model: bool = False,
           env: dict[str, str] | None = None, keeps: tuple[str, ...] = ()) -> BadInputCase:
    return BadInputCase(id, ["train", *BAD_INPUT_TRAIN, f"run_name={id}", *overrides], expect, before_model, env,
                        keeps)


BAD_INPUT_CASES = [
    # ---- configuration: keys, values, groups, syntax, cross-field rules, the machine
    _train("unknown_key", ["foo=1"], ["Could not override 'foo'", "spelling"]),
    _train("unknown_nested_key", ["training.lr=0.1"], ["Could not override 'training.lr'", "spelling"]),
    _train("wrong_type", ["training.max_steps=abc"], ["training.max_steps = 'abc' is invalid", "integer"]),
    _train("out_of_range", ["training.learning_rate=-1"], ["training.learning_rate = -1 is invalid", "greater than 0"]),
    _train("bad_choice", ["peft.method=qlora"], ["peft.method = 'qlora' is invalid", "'lora' or 'dora'"]),
    _train("unknown_group_option", ["model=nope"], ["Could not find 'model/nope'", "Available options"]),
    _train("override_syntax", ["training.max_steps=[1,"],
           ["Could not parse the override 'training.max_steps=[1,'", "close its brackets"], True),
    _train("nan_step_past_end", ["training.debug_nan_at_step=5"], ["debug_nan_at_step is past training.max_steps"]),
    _train("loftq_without_4bit_base", ["peft.init=loftq"], ["peft.init=loftq", "model.quantization=nf4"]),
    _train("pissa_with_dora", ["peft.init=pissa", "peft.method=dora"], ["peft.method=dora is not supported"]),
    _train("run_name_with_slash", ["run_name=a/b"], ["run_name = 'a/b' is invalid", "plain directory name"]),
    _train("empty_target_list", ["peft.target_modules=[]"], ["peft.target_modules", "at least one module"]),
    _train("fp16_on_cpu", ["training.precision=fp16"], ["training.precision=fp16 is not supported on CPU"]),
    _train("cuda_without_gpu", ["training.device=cuda"], ["training.device=cuda but no CUDA GPU is visible"]),
    # ---- quantized bases (issue 15; a missing bitsandbytes, MPS and FSDP are in tests/unit/test_quant.py)
    _train("lean_true_on_quantized_base", ["model.quantization=int8", "peft.lean=true"],
           ["peft.lean=true cannot run on a quantized base (model.quantization=int8)"], True),
    _train("malloc_mode_unknown", [], ["LLAMA_LORA_MALLOC='fast' is not a malloc mode", "keep", "return"], True,
           env={"LLAMA_LORA_MALLOC": "fast"}),
    BadInputCase("merge_into_quantized_output", ["merge", "{w}/runs/good", "model.quantization=nf4"],
                 ["merge cannot write a quantized model (model.quantization=nf4)", "Nothing was written"],
                 keeps=("{w}/runs/good/adapter/adapter_model.safetensors", "{w}/runs/good/config.yaml")),
    # ---- model: missing, not a model, corrupted, pickle-only, unreachable hub, wrong target modules
    _train("model_missing", ["model.name_or_path=/nonexistent/model"], ["'/nonexistent/model' does not exist"], True),
    _train("model_dir_without_config", ["model.name_or_path={w}/empty_model"], ["has no config.json"], True),
    _train("model_corrupted_safetensors", ["model.name_or_path={w}/corrupt_model"],
           ["Could not load the model from the local path", "SafetensorError", "corrupted or incomplete"]),
    _train("model_pickle_only", ["model.name_or_path={w}/bin_model"], ["Could not load the model", "model.safetensors"]),
    _train("hub_model_unreachable", ["model.name_or_path=meta-llama/Llama-3.2-1B-Instruct"],
           ["Could not load the tokenizer 'meta-llama/Llama-3.2-1B-Instruct'", "could not be reached", "HF_TOKEN"], True),
    _train("target_modules_missing", ["peft.target_modules=[foo_proj]"],
           ["peft.target_modules names ['foo_proj']", "does not have", "q_proj"]),
    # ---- data: paths, formats, rows, columns, filtering, splits, lengths, batch
    _train("data_missing", ["data.source=/nonexistent/data.jsonl"], ["'/nonexistent/data.jsonl' does not exist"], True),
    _train("data_bad_extension", ["data.source={w}/notes.txt"], ["unsupported extension", ".jsonl"], True),
    _train("data_malformed_jsonl", ["data.source={w}/malformed.jsonl"], ["malformed.jsonl line 11", "valid JSON"], True),
    _train("data_row_not_an_object", ["data.source={w}/not_objects.jsonl"], ["line 3", "must be a JSON object"], True),
    _train("data_empty_file", ["data.source={w}/empty.jsonl"], ["empty.jsonl is empty"], True),
    _train("data_corrupted_parquet", ["data.source={w}/broken.parquet"], ["Could not read data.source", "broken.parquet"], True),
    _train("data_missing_columns", ["data.source={w}/other_columns.jsonl"],
           ["no column(s) ['instruction', 'output']", "['prompt', 'completion']", "data.columns.instruction="], True),
    _train("data_column_mapping_wrong", ["data.columns.output=answer"], ["no column(s) ['answer']"], True),
    _train("data_empty_after_filtering", ["data.source={w}/empty_outputs.jsonl"],
           ["no usable example", "missing/empty instruction or output"], True),
    _train("data_dir_without_train", ["data.source={w}/no_train_dir"], ["no train.jsonl"], True),
    _train("data_list_valued_output", ["data.source={w}/list_outputs.jsonl"],
           ["row 5: column 'output' holds a list", "not text", "data.columns.output="], True),
    _train("data_parquet_binary_column", ["data.source={w}/binary.parquet"],
           ["row 1: column 'output' holds bytes", "not text"], True),
    _train("data_dir_mixed_formats", ["data.source={w}/mixed_dir"], ["mixes file formats"], True),
    _train("data_unknown_split", ["data.train_split=nope"], ["Split 'nope' is not valid", "train"], True),
    _train("data_hub_unreachable", ["data.source=nobody/no-such-data"], ["Could not load the data set", "could not be reached"], True),
    _train("max_seq_length_too_short", ["data.max_seq_length=8"], ["no usable example", "Raise data.max_seq_length"], True),
    _train("batch_larger_than_data", ["training.micro_batch_size=100"], ["fewer than one global batch"]),
    # ---- output and run directory: unwritable, finished, unresumable checkpoints
    _train("output_dir_unwritable", ["output_dir={w}/a_file/sub"], ["Cannot write to the output directory", "Not a directory"], True),
    _train("finished_run_not_overwritten", ["run_name=finished"], ["holds a finished run", "overwrite=true"], True),
    _train("resume_never_with_checkpoints", ["run_name=partial", "training.resume=never"],
           ["unfinished run with checkpoints", "training.resume=auto"], True),
    _train("checkpoint_corrupted", ["run_name=corrupt_ckpt"],
           ["Cannot resume from the checkpoint", "step-000002", "corrupted"]),
    _train("checkpoint_other_rank", ["run_name=r4_ckpt", "peft.r=8"],
           ["Cannot resume from the checkpoint", "size mismatch", "another model/adapter configuration"]),
    _train("checkpoint_other_targets", ["run_name=q_only_ckpt"],
           ["Cannot resume from the checkpoint", "lacks", "expected weights"]),
    # ---- other commands: what they load
    BadInputCase("unknown_command", ["trian"], ["unknown command 'trian'"]),
    BadInputCase("infer_run_missing", ["infer", "infer.run_dir=/nonexistent/run", "Hi"], ["'/nonexistent/run' does not exist"]),
    BadInputCase("infer_not_a_run", ["infer", "infer.run_dir={w}", "Hi"], ["neither a llama-lora run directory"]),
    BadInputCase("infer_adapter_corrupted", ["infer", "infer.run_dir={w}/runs/corrupt_adapter", "Hi"],
                 ["Could not load the adapter", "corrupted"]),
    BadInputCase("infer_adapter_other_base", ["infer", "infer.run_dir={w}/runs/other_base", "Hi"],
                 ["Could not load the adapter", "different base model"]),
    BadInputCase("infer_input_file_malformed", ["infer", "infer.run_dir={w}/runs/good", "--input-file", "{w}/malformed.jsonl"],
                 ["line 11 is not valid JSON"]),
    BadInputCase("merge_adapter_corrupted", ["merge", "infer.run_dir={w}/runs/corrupt_adapter"], ["Could not load the adapter"]),
    BadInputCase("validate_unknown_key", ["validate", "foo=1"], ["Could not override 'foo'"]),
    # ---- issue 19, kind 5: files that are not llama-lora's, caches that are files
    BadInputCase("merge_keeps_the_users_merged_file", ["merge", "{w}/runs/user_merged"],
                 ["user_merged/merged exists and is a file", "llama-lora did not write it", "Nothing was changed"],
                 keeps=("{w}/runs/user_merged/merged",)),
    BadInputCase("merge_keeps_the_users_merged_folder", ["merge", "{w}/runs/user_merged_dir"],
                 ["exists and is a folder without merge.json", "Move or rename it"],
                 keeps=("{w}/runs/user_merged_dir/merged/notes.txt",)),
    _train("hf_home_is_a_file", [], ["HF_HOME=", "a_file cannot be a cache folder", "a_file is a file", "unset HF_HOME"],
           True, env={"HF_HOME": "{w}/a_file"}),
    _train("cache_env_is_a_file", ["model=embedded"], ["LLAMA_LORA_CACHE=", "a_file cannot be a cache folder"],
           True, env={"LLAMA_LORA_CACHE": "{w}/a_file"}),
    # ---- issue 19, kind 6: messages that say what to do
    _train("override_needs_quotes_slice", ["data.train_split=train[:0%]"],
           ["Could not parse the override 'data.train_split=train[:0%]'", "quoted for Hydra",
            "'data.train_split=\"train[:0%]\"'"], True),
    _train("override_needs_quotes_space", ["run_name=my run (2)"],
           ["Could not parse the override 'run_name=my run (2)'", "'run_name=\"my run (2)\"'"], True),
    _train("split_slice_selects_nothing", ['data.train_split="train[:0%]"'],
           ["data.train_split 'train[:0%]' selects no rows", "its 'train' split has 24 rows", "Widen it"], True),
    _train("split_slice_backwards", ['data.train_split="train[90%:10%]"'],
           ["data.train_split 'train[90%:10%]' selects no rows", "24 rows"], True),
    _train("eval_split_slice_selects_nothing", ['data.eval_split="train[:0]"'],
           ["data.eval_split 'train[:0]' selects no rows"], True),
    _train("max_seq_length_beyond_positions", ["data.max_seq_length=4096"],
           ["data.max_seq_length=4096 is above the model's 512 positions", "data.max_seq_length=512 or less"], True),
    BadInputCase("validate_max_seq_length_beyond_positions",
                 ["validate", *BAD_INPUT_TRAIN, "data.max_seq_length=4096"],
                 ["[sequence length] data.max_seq_length=4096 is above the model's 512 positions"]),
    BadInputCase("infer_empty_prompt", ["infer", "infer.run_dir={w}/runs/good", "  "], ["The prompt is empty"]),
    BadInputCase("infer_prompt_beyond_positions", ["infer", "infer.run_dir={w}/runs/good", "word " * 2000],
                 ["The prompt is", "tokens once formatted", "512 positions", "no room left for an answer"]),
    BadInputCase("infer_input_file_empty_prompt", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                                   "{w}/empty_prompt.jsonl"], ["line 1: the prompt is empty"]),
    BadInputCase("infer_input_file_non_text", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                               "{w}/nontext_prompt.jsonl"], ["line 1", "'input'", "list"]),
]
BAD_INPUT_CASES += [
    # ---- never touch what llama-lora did not write (train into a folder that is not a run)
    _train("train_foreign_folder_resume_never", ["output_dir={w}/user", "run_name=photos", "training.resume=never"],
           ["user/photos is a folder that llama-lora did not write", "Nothing was changed"], True,
           keeps=("{w}/user/photos/2024/img1.jpg",)),
    _train("train_foreign_folder_overwrite", ["output_dir={w}/user", "run_name=photos", "overwrite=true"],
           ["user/photos is a folder that llama-lora did not write"], True, keeps=("{w}/user/photos/2024/img1.jpg",)),
    _train("train_foreign_folder_default", ["output_dir={w}/user", "run_name=proj"],
           ["user/proj is a folder that llama-lora did not write", "Choose another run_name"], True,
           keeps=("{w}/user/proj/checkpoints/important.bin", "{w}/user/proj/config.yaml")),
    _train("train_output_dir_is_a_runs_adapter", ["output_dir={w}/runs/good", "run_name=adapter"],
           ["runs/good/adapter is a folder that llama-lora did not write"], True,
           keeps=("{w}/runs/good/adapter/adapter_model.safetensors",)),
    _train("train_output_dir_inside_a_run", ["output_dir={w}/runs/good", "run_name=new"],
           ["runs/good is the llama-lora run folder", "Choose an output_dir outside it"], True,
           keeps=("{w}/runs/good/config.yaml",)),
    # ---- adapter settings the model cannot take, settings that would be ignored, names too long
    _train("pissa_rank_above_layer_size", ["peft.init=pissa", "peft.r=200"],
           ["peft.r=200 is larger than the adapted layer", "has only 64", "peft.r=64 or less"]),
    BadInputCase("validate_pissa_rank_above_layer_size",
                 ["validate", *BAD_INPUT_TRAIN, "peft.init=pissa", "peft.r=200"],
                 ["peft.r=200 is larger than the adapted layer"]),
    _train("lm_head_tied_target", ["peft.target_modules=[q_proj,lm_head]"],
           ["lm_head, the output head", "ties to its input embeddings", "Remove lm_head"]),
    _train("group_by_length_with_packing", ["data.group_by_length=true"],
           ["data.group_by_length=true has no effect with data.packing=true", "data.packing=false"], True),
    _train("run_name_too_long", ["run_name=" + "r" * 240], ["run_name", "240 bytes long", "at most 230"], True),
    # ---- runs that cannot be used yet, damaged run files, a run path with '=' in it
    BadInputCase("infer_interrupted_run", ["infer", "infer.run_dir={w}/out/r4_ckpt", "Hi"],
                 ["is a llama-lora run whose training did not finish (interrupted)", "Resume it",
                  "run_name=r4_ckpt"]),
    BadInputCase("eval_run_path_with_equals", ["eval", "{w}/sweep/peft.r=2"],
                 ["peft.r=2 is a llama-lora run whose training did not finish"]),
    BadInputCase("infer_damaged_config", ["infer", "infer.run_dir={w}/runs/bad_config", "Hi"],
                 ["saved config", "bad_config/config.yaml is damaged", "Restore it"]),
    BadInputCase("infer_damaged_prompt_format", ["infer", "infer.run_dir={w}/runs/bad_prompt", "Hi"],
                 ["prompt format", "bad_prompt/prompt.json is damaged"]),
    # ---- infer's files: checked before the model loads, the user's files kept
    BadInputCase("infer_output_file_is_a_folder", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                                   "{w}/prompts.jsonl", "--output-file", "{w}/user"],
                 ["--output-file", "is a folder"], True),
    BadInputCase("infer_output_file_is_the_users", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                                    "{w}/prompts.jsonl", "--output-file", "{w}/notes.txt"],
                 ["is not an answers file written by `llama-lora infer`"], True, keeps=("{w}/notes.txt",)),
    BadInputCase("infer_output_file_is_the_input", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                                    "{w}/prompts.jsonl", "--output-file", "{w}/prompts.jsonl"],
                 ["is the --input-file"], True, keeps=("{w}/prompts.jsonl",)),
    BadInputCase("infer_input_file_binary", ["infer", "infer.run_dir={w}/runs/good", "--input-file", "{w}/binary.bin"],
                 ["is not UTF-8 text", "byte 16 (line 2) is 0xff"], True),
    BadInputCase("infer_input_file_lone_surrogate", ["infer", "infer.run_dir={w}/runs/good", "--input-file",
                                                     "{w}/surrogate.jsonl"],
                 ["line 1: the prompt holds an unpaired surrogate", "\\ud83d"], True),
]
BAD_INPUT_IN_SUBPROCESS = ["unknown_key", "infer_adapter_corrupted", "train_foreign_folder_resume_never",
                           "infer_input_file_binary"]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _row(i: int) -> dict:
    word = ["apple", "river", "stone", "cloud", "music"][i % 5] + str(i)
    return {"instruction": "Uppercase the word.", "input": word, "output": word.upper()}


def _parquet_binary(path: Path, rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("instruction", "input")}
                            | {"output": [r["output"].encode() for r in rows]}), path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fake_run(path: Path, base: Path, adapter_model, cfg_yaml: str) -> None:
    """A finished run directory as train leaves it (config, status, prompt format, adapter)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(cfg_yaml)
    (path / "run.json").write_text(json.dumps({"status": "finished", "base_model": str(base)}))
    (path / "prompt.json").write_text(json.dumps({"kind": "chat", "system_prompt": None}))
    adapter_model.save_pretrained(path / "adapter", safe_serialization=True)


def _checkpoint(run: Path, adapter_model) -> Path:
    ckpt = run / "checkpoints" / "step-000002"
    adapter_model.save_pretrained(ckpt, safe_serialization=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    return ckpt


def build_bad_input_world(w: Path, tiny_base: Path) -> Path:
    """The broken world the bad-input cases point at ("{w}"), built in the empty folder `w`."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llama_lora.config.load import load_config, to_yaml

    good = [_row(i) for i in range(24)]
    _jsonl(w / "good.jsonl", good)
    _jsonl(w / "malformed.jsonl", good[:10] + ['{"instruction": "x", "output": '] + good[10:])
    _jsonl(w / "not_objects.jsonl", good[:2] + ["[1, 2]"] + good[2:])
    (w / "empty.jsonl").write_text("")
    (w / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (w / "notes.txt").write_text("hello")
    _jsonl(w / "other_columns.jsonl", [{"prompt": r["instruction"], "completion": r["output"]} for r in good])
    _jsonl(w / "empty_outputs.jsonl", [r | {"output": " "} for r in good])
    _jsonl(w / "list_outputs.jsonl", [r | {"output": [r["output"], "or"]} if i == 4 else r for i, r in enumerate(good)])
    _parquet_binary(w / "binary.parquet", good)
    (w / "no_train_dir").mkdir()
    _jsonl(w / "no_train_dir" / "validation.jsonl", good)
    (w / "mixed_dir").mkdir()
    _jsonl(w / "mixed_dir" / "train.jsonl", good)
    (w / "mixed_dir" / "validation.csv").write_text("instruction,input,output\na,,b\n")
    (w / "a_file").write_text("")

    (w / "empty_model").mkdir()
    shutil.copytree(tiny_base, w / "corrupt_model")
    _truncate(w / "corrupt_model" / "model.safetensors")
    shutil.copytree(tiny_base, w / "bin_model")  # weights only as a pickle: refused, never unpickled
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_base).state_dict(), w / "bin_model" / "pytorch_model.bin")
    (w / "bin_model" / "model.safetensors").unlink()

    def lora(r=4, targets="all-linear", model=None):
        return get_peft_model(model or AutoModelForCausalLM.from_pretrained(tiny_base),
                              LoraConfig(r=r, target_modules=targets, task_type="CAUSAL_LM"))

    out = w / "out"
    finished = out / "finished"
    _fake_run(finished, tiny_base, lora(), "{}\n")
    (finished / "metrics.json").write_text('{"eval_loss": 1.0}')
    (out / "partial" / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "partial" / "checkpoints" / "step-000002" / "trainer_state.json").write_text('{"step": 2}')
    (out / "partial" / "run.json").write_text('{"status": "interrupted", "step": 2}')
    # Folders that are not llama-lora's, where a train would write (`output_dir={w}/user run_name=...`).
    (w / "user" / "photos" / "2024").mkdir(parents=True)
    (w / "user" / "photos" / "2024" / "img1.jpg").write_bytes(b"\xff\xd8jpeg")
    (w / "user" / "proj" / "checkpoints").mkdir(parents=True)
    (w / "user" / "proj" / "checkpoints" / "important.bin").write_bytes(b"weights of mine")
    (w / "user" / "proj" / "config.yaml").write_text("mine: true\n")
    # infer's input and output files
    _jsonl(w / "prompts.jsonl", [{"prompt": "Hi"}])
    (w / "binary.bin").write_bytes(b'{"prompt": "a"}\n\xff\xfe\x00binary')
    (w / "surrogate.jsonl").write_text('{"prompt": "cut emoji \\ud83d"}\n')
    _truncate(_checkpoint(out / "corrupt_ckpt", lora()) / "adapter_model.safetensors")
    _checkpoint(out / "r4_ckpt", lora(r=4))
    _checkpoint(out / "q_only_ckpt", lora(r=4, targets=["q_proj"]))

    cfg_yaml = to_yaml(load_config([f"model.name_or_path={tiny_base}", f"data.source={w}/good.jsonl",
                                    "data.train_split=train", "infer.max_new_tokens=4"]))
    _fake_run(w / "runs" / "good", tiny_base, lora(), cfg_yaml)
    _fake_run(w / "runs" / "corrupt_adapter", tiny_base, lora(), cfg_yaml)
    _fake_run(w / "runs" / "user_merged", tiny_base, lora(), cfg_yaml)
    (w / "runs" / "user_merged" / "merged").write_text("my notes, not a model\n")
    _fake_run(w / "runs" / "user_merged_dir", tiny_base, lora(), cfg_yaml)
    (w / "runs" / "user_merged_dir" / "merged").mkdir()
    (w / "runs" / "user_merged_dir" / "merged" / "notes.txt").write_text("mine\n")
    _jsonl(w / "empty_prompt.jsonl", [{"prompt": ""}])
    _jsonl(w / "nontext_prompt.jsonl", [{"instruction": 5, "input": ["x"]}])
    _truncate(w / "runs" / "corrupt_adapter" / "adapter" / "adapter_model.safetensors")
    _fake_run(w / "runs" / "bad_config", tiny_base, lora(), "model: [name_or_path: x\n")  # not YAML
    _fake_run(w / "runs" / "bad_prompt", tiny_base, lora(), cfg_yaml)
    (w / "runs" / "bad_prompt" / "prompt.json").write_text('{"kind": "chat", "style": "old"}')
    shutil.copytree(out / "r4_ckpt", w / "sweep" / "peft.r=2")  # a path with '=': an interrupted run
    other = AutoModelForCausalLM.from_pretrained(tiny_base).config
    other.hidden_size, other.intermediate_size, other.head_dim = 64, 96, 16
    _fake_run(w / "runs" / "other_base", tiny_base, lora(model=LlamaForCausalLM(other)), cfg_yaml)
    return w


def bad_input_argv(case: BadInputCase, base: Path, w: Path) -> list[str]:
    return [a.format(base=base, w=w) for a in case.argv]


def error_paragraph(text: str) -> str:
    """The error paragraph the CLI printed, whitespace-normalised (it is wrapped at 100 columns)."""
    assert "error: " in text, text[-2000:]
    return " ".join(text[text.rindex("error: "):].split("\n\n")[0].split())


# ----------------------------------------------------------------------------------------------------
# Reliability (tests/integration/test_resume.py, test_signals.py): a tiny training run through the real
# CLI in a subprocess that a test can watch, signal or kill, and the uninterrupted reference it is
# compared to.

STEPS = 10
WORDS = ["apple", "house", "river", "stone", "cloud", "green", "table", "light", "music", "ocean"]


def data_file(root: Path) -> Path:
    """64 uppercase-the-word records (idempotent: every caller in the session gets the same file)."""
    path = root / "reliability-data.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        rows = []
        for _ in range(64):
            w = rng.choice(WORDS) + rng.choice(WORDS)
            rows.append(json.dumps({"instruction": "Uppercase the word.", "input": w, "output": w.upper()}))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        tmp.replace(path)
    return path


def train_args(base: Path, data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """10 steps of 2x2 examples, a checkpoint every 3 steps, eval after every step, loss logged every
    2 steps: logging windows span checkpoints, and something is logged at every checkpoint step."""
    return [
        "train", f"model.name_or_path={base}", f"data.source={data}", "data.train_split=train",
        f"output_dir={out}", f"run_name={name}", f"training.max_steps={STEPS}", "training.micro_batch_size=2",
        "training.gradient_accumulation_steps=2", "training.save_every=3", "training.eval_every=1",
        "training.log_every=2", "training.learning_rate=1e-3", "data.max_eval_examples=4", "eval.batch_size=4",
        "training.keep_checkpoints=2", "peft.r=4", "peft.dropout=0.1", *extra,
    ]


class TrainProc:
    """`python -m llama_lora.cli train ...` in the background; stdout+stderr go to a file."""

    def __init__(self, args: list[str], log_file: Path, env: dict[str, str] | None = None):
        self.log_file = log_file
        self._fh = open(log_file, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_lora.cli", *args], stdout=self._fh,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_file.read_text()

    def wait_until(self, predicate, timeout: float = 120, what: str = "") -> None:
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def wait_for_step(self, run: Path, step: int) -> None:
        """Until train.log shows optimizer step `step` finished (a log line or a checkpoint at it)."""
        log = run / "train.log"
        marks = (f"step {step}/", f"step {step} eval")
        self.wait_until(lambda: log.is_file() and any(m in log.read_text() for m in marks), what=f"step {step}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._fh.close()


def run_to_end(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> str:
    proc = TrainProc(args, log_file, env)
    rc = proc.wait()
    assert rc == 0, f"training failed ({rc}):\n{proc.output()[-4000:]}"
    return proc.output()


def reference_run(root: Path, base: Path) -> Path:
    """The uninterrupted run every interrupted one must reproduce (trained once per session)."""
    run = root / "reference" / "ref"
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        run_to_end(train_args(base, data_file(root), root / "reference", "ref"), root / "reference.out")
    return run


def adapter(run: Path) -> dict:
    """The run's adapter tensors by name (dict[str, torch.Tensor])."""
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run: Path, ref: Path) -> None:
    import torch

    got, want = adapter(run), adapter(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")  # fp32 tolerances
    # and not trivially: training moved the adapter away from its initialisation (B starts at zero)
    assert any(float(t.abs().max()) > 0 for k, t in want.items() if "lora_B" in k)


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar as [(step, value)], read back as TensorBoard itself would."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_curve_continues(run: Path, ref: Path) -> None:
    """One value per logged step, steps increasing, no restart, and the same numbers as the reference."""
    import torch

    got, want = scalars(run), scalars(ref)
    assert sorted(got) == sorted(want) == ["eval/loss", "train/loss", "train/lr", "train/tokens_per_second"]
    assert [s for s, _ in want["eval/loss"]] == list(range(STEPS + 1))  # eval at 0 (before training) .. 10
    assert [s for s, _ in want["train/loss"]] == [2, 4, 6, 8, 10]
    for tag in got:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], f"{tag}: steps {steps}"
        if tag != "train/tokens_per_second":  # a wall-clock rate
            torch.testing.assert_close([v for _, v in got[tag]], [v for _, v in want[tag]], msg=tag)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_metrics(run: Path, ref: Path) -> None:
    got, want = metrics(run), metrics(ref)
    for key in ("steps", "tokens_seen", "response_tokens_seen"):
        assert got[key] == want[key], key
    for key in ("train_loss", "eval_loss", "eval_loss_before"):
        assert abs(got[key] - want[key]) < 1e-5, key


# ----------------------------------------------------------------------------------------------------
# Places a command must leave alone (tests/integration/test_export.py): read-only mounts, foreign files.


def can_mount_read_only(tmp: Path) -> bool:
    """Whether `unshare -rm` can make a read-only bind mount here (a private mount namespace, no root)."""
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = tmp / ".ro-probe"
    probe.mkdir(exist_ok=True)
    cmd = f"mount --bind {probe} {probe} && mount -o remount,ro,bind {probe} {probe} && ! touch {probe}/x"
    return subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True).returncode == 0


def run_cli_read_only(folders: list[Path], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`llama-lora args` in a private mount namespace in which each of `folders` is mounted read-only."""
    import shlex

    mounts = " && ".join(f"mount --bind {shlex.quote(str(f))} {shlex.quote(str(f))} && "
                         f"mount -o remount,ro,bind {shlex.quote(str(f))}" for f in folders)
    cli = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "llama_lora.cli", *args])
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mounts} && exec {cli}"], capture_output=True, text=True,
                          timeout=timeout)


def dead_pid() -> int:
    """A process id no process can have (above the kernel's pid_max), nor the ids just above it."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**31 - 1


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (itself excluded), links not followed: its kind, bytes (files) and mtime_ns."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
        out[str(p.relative_to(root))] = (kind, p.read_bytes() if kind == "file" else None, st.st_mtime_ns)
    return out
