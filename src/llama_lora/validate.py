"""`llama-lora validate [overrides]`: check a configuration before spending GPU hours on it.

The schema (already checked when the config loads), that the model and data exist or the hub answers
(with advice for gated models), the pad token, the target modules (on a model built from its config
on the meta device: instant, no weights), the memory estimate against the device, and a pre-flight
data check: a few examples rendered as training sees them (trained tokens marked), EOS among the
labels, pad != eos, no fully masked example, the share truncated, and that inference will build the
same prompt. Prints a report; exits non-zero when something is wrong.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.table import Table
from rich.text import Text

from llama_lora import data as data_lib, model as model_lib
from llama_lora.config.schema import EMBEDDED, Config
from llama_lora.errors import LlamaLoraError
from llama_lora.plan import PlanError, RunPlan, plan_run, sharded_launch
from llama_lora.planner import batch_split, plan_memory

log = logging.getLogger("llama_lora.validate")

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
PREFLIGHT_ROWS = 2000  # rows tokenized for the data statistics (keeps validate quick on big data sets)
SHOWN_EXAMPLES = 3
TRAINED_MARK = ("⟦", "⟧")  # wraps trained (unmasked) tokens, readable without colour too


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    examples: list[Text] = field(default_factory=list)
    memory: str | None = None

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def status(self, name: str) -> str:
        return next(c.status for c in self.checks if c.name == name)


def check(cfg: Config) -> Report:
    """Run every check; never raises for a problem it can report."""
    report = Report()
    report.add("config", OK, f"schema valid (preset {cfg.preset}, {cfg.peft.method} r={cfg.peft.r}, "
                             f"data {cfg.data.source})")
    try:  # the plan train would run (plan.plan_run), reported part by part
        plan = plan_run(cfg, model_lib.probe_capabilities(), sharded_launch())
    except PlanError as e:
        plan = None
        report.add(e.part, FAIL, str(e))
        if e.part == "device":
            report.add("training step", SKIP, "needs the device (see above)")
    if plan is not None:
        report.add("device", OK, plan.runtime.reason)
        _report_step(cfg, plan, report)

    model_path, model_config = _check_model(cfg, report)
    tokenizer = _check_tokenizer(cfg, model_path, report) if model_config is not None else None
    if model_config is not None:
        try:
            data_lib.check_positions(cfg.data, model_config)
        except LlamaLoraError as e:
            report.add("sequence length", FAIL, str(e))
        _check_target_modules(cfg, model_config, report)
        if plan is not None:
            _check_memory(cfg, model_config, plan, report)
    else:
        for name in ("tokenizer", "target modules", "memory"):
            report.add(name, SKIP, "needs the model (see above)")

    if _check_data_source(cfg, report) and tokenizer is not None:
        _preflight(cfg, tokenizer, model_path, report)
    elif tokenizer is None:
        report.add("data pre-flight", SKIP, "needs the tokenizer (see above)")
    return report


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer, target modules, memory.


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _token_hint() -> str:
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return (" HF_HUB_OFFLINE is set, so the hub is not contacted." if offline else "") + (
        " No Hugging Face token is set: for a gated model run `huggingface-cli login` or export HF_TOKEN=hf_..."
        if token is None else ""
    )


def _check_model(cfg: Config, report: Report):
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    if name != EMBEDDED and _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            report.add("model", FAIL, f"model.name_or_path '{name}' does not exist. Give an existing model "
                                      "directory, a hub id, or model=embedded (offline).")
            return None, None
        if not (path / "config.json").is_file():
            report.add("model", FAIL, f"model.name_or_path '{name}' has no config.json: not a transformers model "
                                      "directory.")
            return None, None
    try:
        path = model_lib.resolve_model_path(name)
        conf = AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except LlamaLoraError as e:
        report.add("model", FAIL, str(e))
        return None, None
    except Exception as e:
        report.add("model", FAIL, str(model_lib.hub_error(e, "model", name)) + _token_hint())
        return None, None
    where = "embedded tiny Llama, cached at " + path if name == EMBEDDED else path
    report.add("model", OK, f"{where}: {conf.model_type}, {conf.num_hidden_layers} layers, hidden "
                            f"{conf.hidden_size}, vocabulary {conf.vocab_size}")
    return path, conf


def _check_tokenizer(cfg: Config, path: str, report: Report):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        report.add("tokenizer", FAIL, str(model_lib.hub_error(e, "tokenizer", cfg.model.name_or_path)))
        return None
    had = tok.pad_token
    model_lib.ensure_pad_token(tok)
    if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
        report.add("pad token", WARN, f"pad = eos ({tok.eos_token!r}): no spare token for padding. Labels are "
                                      "masked explicitly so training is correct, but check any other tooling.")
    elif had is None:
        report.add("pad token", OK, f"the tokenizer has none; it gets {tok.pad_token!r} (id {tok.pad_token_id}), "
                                    f"distinct from eos {tok.eos_token!r}")
    else:
        report.add("pad token", OK, f"{tok.pad_token!r} (id {tok.pad_token_id}), distinct from eos {tok.eos_token!r}")
    return tok


def _meta_model(model_config, cfg: Config):
    """The model built from its config on the meta device: every module, no memory, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)


def _check_target_modules(cfg: Config, model_config, report: Report) -> None:
    from llama_lora.adapter import check_adapter_fits, linear_module_names

    try:
        model = _meta_model(model_config, cfg)
    except Exception as e:
        report.add("target modules", FAIL, f"could not build the model from its config ({type(e).__name__}: {e})")
        return
    try:
        check_adapter_fits(model, cfg.peft)
    except LlamaLoraError as e:
        report.add("target modules", FAIL, str(e))
        return
    names = linear_module_names(model) if cfg.peft.target_modules == "all-linear" else cfg.peft.target_modules
    report.add("target modules", OK, f"{cfg.peft.target_modules if isinstance(cfg.peft.target_modules, str) else 'named'}"
                                     f": {', '.join(names)}")


def _report_step(cfg: Config, plan: RunPlan, report: Report) -> None:
    """What the training step will run, as the plan decided it."""
    report.add("training step", OK, plan.lean.describe())
    if cfg.model.quantization != "none":  # the device check above already refused MPS / no bitsandbytes
        report.add("quantization", OK, model_lib.describe_quantization(cfg.model.quantization, plan.runtime.precision)
                   + "; the memory plan counts the packed weights and their block statistics; FSDP/DeepSpeed "
                   "are refused with it (DDP works)")


def _check_memory(cfg: Config, model_config, run_plan: RunPlan, report: Report) -> None:
    device = run_plan.device
    chosen = ""
    if cfg.training.planner_sizes_batch(device):  # as train.py: the planner picks the micro-batch
        try:
            run_cfg, _ = batch_split(cfg, model_config, run_plan, [])
        except LlamaLoraError as e:
            report.add("memory", FAIL, str(e).splitlines()[0])
            return
        micro = run_cfg.training.micro_batch_size
        chosen = f"; the planner picks micro-batch {micro} x {run_cfg.training.gradient_accumulation_steps} accumulation"
    else:
        micro = cfg.training.base_micro_batch_size
    plan = plan_memory(cfg, model_config, run_plan, micro)
    report.memory = plan.report()
    gib = 2**30
    if plan.available_bytes is None:
        report.add("memory", WARN, f"needs about {plan.total_bytes / gib:.2f} GiB on {device}; available memory "
                                   "unknown (set training.memory_budget_gb)")
    elif plan.fits:
        report.add("memory", OK, f"about {plan.total_bytes / gib:.2f} GiB of {plan.available_bytes / gib:.2f} GiB "
                                 f"available on {device}{chosen}")
    else:
        report.add("memory", FAIL, f"needs about {plan.total_bytes / gib:.2f} GiB but {device} has "
                                   f"{plan.available_bytes / gib:.2f} GiB"
                                   f"{' (training.memory_budget_gb)' if cfg.training.memory_budget_gb else ''}. "
                                   "Lower training.micro_batch_size (raise gradient_accumulation_steps to keep the "
                                   "batch), data.max_seq_length or peft.r, or set model.gradient_checkpointing=true.")


# ----------------------------------------------------------------------------------------------------
# Data: source, then the pre-flight check on rendered, tokenized examples.


def _check_data_source(cfg: Config, report: Report) -> bool:
    try:
        splits = data_lib.available_splits(cfg.data.source)
    except LlamaLoraError as e:
        msg = str(e) + (_token_hint() if not _looks_local(cfg.data.source) and cfg.data.source != EMBEDDED else "")
        report.add("data", FAIL, msg)
        return False
    report.add("data", OK, f"{cfg.data.source}: splits {', '.join(splits)}")
    return True


def _stop_ids(tokenizer, model_path: str) -> list[int]:
    """The ids inference stops at (generation_config eos + tokenizer eos + Llama 3 end tokens)."""
    from transformers import GenerationConfig

    from llama_lora.generation import stop_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except Exception:
        gen = None
    return stop_token_ids(SimpleNamespace(generation_config=gen), tokenizer)


def _preflight(cfg: Config, tokenizer, model_path: str, report: Report) -> None:
    from transformers import AutoTokenizer

    from llama_lora.data import IGNORE_INDEX, PromptFormat

    try:
        fmt = PromptFormat.choose(cfg.data, tokenizer)
        ds = data_lib.load_split(cfg.data.source, cfg.data.train_split, "data.train_split")
        sample = ds.select(range(min(len(ds), PREFLIGHT_ROWS)))
        examples, stats = data_lib.tokenize_dataset(sample, cfg.data, tokenizer, fmt, "train")
    except LlamaLoraError as e:
        report.add("data pre-flight", FAIL, str(e))
        return
    of = f"of the first {len(sample)} rows" if len(sample) < len(ds) else f"of {len(ds)} rows"
    report.add("prompt format", OK, f"{fmt.kind}" + (" (the tokenizer's chat template)" if fmt.kind == "chat"
                                                    else " (Alpaca prompt)"))

    # EOS must be trained, or the model never learns to stop. Truncated examples lose it legitimately.
    stops = set(_stop_ids(tokenizer, model_path))
    lacking = sum(1 for e in examples if len(e["input_ids"]) < cfg.data.max_seq_length
                  and not stops & {label for label in e["labels"] if label != IGNORE_INDEX})
    names = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stops)]
    if lacking:
        report.add("eos in labels", FAIL, f"{lacking} of {len(examples)} untruncated examples have no stop token "
                                          f"({names}) among their trained labels: the model would not learn to stop.")
    else:
        report.add("eos in labels", OK, f"every untruncated example trains a stop token ({', '.join(names)})")

    report.add("pad != eos", OK if tokenizer.pad_token_id != tokenizer.eos_token_id else WARN,
               f"pad {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), eos {tokenizer.eos_token!r} "
               f"(id {tokenizer.eos_token_id})")
    masked = stats.dropped_no_response
    report.add("no fully masked example", OK if not masked else WARN,
               "every example has trained tokens" if not masked else
               f"{masked} examples {of} had every label masked after truncation to data.max_seq_length="
               f"{cfg.data.max_seq_length} and are dropped; raise data.max_seq_length.")
    share = stats.truncated / max(stats.rows, 1)
    report.add("truncated", OK if share < 0.01 else WARN,
               f"{stats.truncated} {of} ({100 * share:.1f}%) exceed data.max_seq_length={cfg.data.max_seq_length} "
               f"(longest kept {stats.max_length} tokens)" + ("" if share < 0.01 else
                                                              "; raise data.max_seq_length to keep whole answers"))
    if stats.dropped_empty:
        report.add("empty rows", WARN, f"{stats.dropped_empty} rows {of} have an empty instruction or output and "
                                       f"are skipped (rows {stats.empty_row_indices[:5]})")

    # Inference reloads the saved tokenizer and prompt.json: the prompt it builds must be the training one.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
        model_lib.ensure_pad_token(reloaded)
    fmt_again = PromptFormat(**fmt.to_dict())
    cols = cfg.data.columns
    rows = [r for r in sample.select(range(min(len(sample), 20)))]
    differ = [i for i, r in enumerate(rows) if str(r.get(cols.instruction) or "").strip() and
              fmt.render(tokenizer, str(r[cols.instruction]).strip(), str(r.get(cols.input) or "").strip(),
                         "x")[0]
              != fmt_again.prompt(reloaded, str(r[cols.instruction]).strip(), str(r.get(cols.input) or "").strip())]
    same_template = getattr(reloaded, "chat_template", None) == getattr(tokenizer, "chat_template", None)
    if differ or not same_template:
        report.add("inference prompt", FAIL, f"the saved tokenizer/prompt format renders {len(differ)} of {len(rows)} "
                                             "prompts differently from training (chat template not saved intact).")
    else:
        report.add("inference prompt", OK, f"the saved tokenizer + prompt.json rebuild the training prompt exactly "
                                           f"({len(rows)} rows compared)")
    report.examples = [_render(tokenizer, e) for e in examples[:SHOWN_EXAMPLES]]


def _render(tokenizer, example: dict) -> Text:
    """The example's text with trained spans wrapped in ⟦ ⟧ (and green); masked text is dimmed."""
    from llama_lora.data import IGNORE_INDEX

    text = Text()
    ids, labels = example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            span = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            if labels[start] == IGNORE_INDEX:
                text.append(span, style="dim")
            else:
                text.append(TRAINED_MARK[0] + span + TRAINED_MARK[1], style="bold green")
            start = i
    n_trained = sum(label != IGNORE_INDEX for label in labels)
    return Text(f"{len(ids)} tokens, {n_trained} trained:\n", style="bold") + text


# ----------------------------------------------------------------------------------------------------


STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 110))
    table = Table(title="llama-lora validate", show_lines=True)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, Text(c.status, style=STYLE[c.status]), c.detail)
    console.print(table)
    if report.memory:
        console.print(report.memory)
    if report.examples:
        console.print(f"\nExamples as training sees them (trained tokens in {''.join(TRAINED_MARK)}, the rest is "
                      "masked out of the loss):")
        for t in report.examples:
            console.print(t)
            console.print()


def run(cfg: Config) -> Report:
    report = check(cfg)
    print_report(report)
    if report.problems:
        raise LlamaLoraError(
            f"validate found {len(report.problems)} problem(s): "
            + " ".join(f"[{c.name}] {c.detail}" for c in report.problems)
        )
    warnings = sum(c.status == WARN for c in report.checks)
    print(f"OK: ready to train{f' ({warnings} warning(s) above)' if warnings else ''}.")
    return report


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["validate", *sys.argv[1:]])
