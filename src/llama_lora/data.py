"""Records -> prompt (chat template or Alpaca) -> tokens -> label mask -> batches (padded or packed)."""

from __future__ import annotations

import json
import logging
import numbers
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llama_lora.config.schema import EMBEDDED, DataConfig
from llama_lora.errors import LlamaLoraError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the cross-entropy skips (prompt and padding positions)

# The Stanford Alpaca prompts, verbatim, for base (non-chat) models.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------------
# Loading: local files, local directories of split files, or hub data sets, all through `datasets`.


def _data_files(source: str) -> tuple[str, dict[str, Any] | None]:
    """Map a source to (builder, data_files); data_files None means a hub id."""
    if source == EMBEDDED:
        from llama_lora.embedded import ensure_dataset

        source = str(ensure_dataset())
    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise LlamaLoraError(f"data.source '{source}' has an unsupported extension; use one of {sorted(_FILE_BUILDERS)}.")
        return builder, {"train": str(path)}
    if path.is_dir():
        files: dict[str, Any] = {}
        for f in sorted(path.iterdir()):
            if f.suffix.lower() in _FILE_BUILDERS and f.stem in ("train", "validation", "test"):
                files[f.stem] = str(f)
        if "train" not in files:
            raise LlamaLoraError(
                f"data.source directory '{source}' has no train.jsonl/.json/.parquet/.csv file; "
                "name the split files train.*, validation.*, test.*."
            )
        builders = {_FILE_BUILDERS[Path(f).suffix.lower()] for f in files.values()}
        if len(builders) > 1:
            raise LlamaLoraError(f"data.source directory '{source}' mixes file formats {sorted(builders)}; use one.")
        return builders.pop(), files
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_FILE_BUILDERS)):
        raise LlamaLoraError(f"data.source '{source}' does not exist. Give an existing file or directory, or a hub id.")
    return source, None


def available_splits(source: str) -> list[str]:
    builder, files = _data_files(source)
    if files is not None:
        return list(files)
    try:
        from datasets import get_dataset_split_names

        return list(get_dataset_split_names(builder))
    except Exception as e:
        from llama_lora.model import hub_error

        raise hub_error(e, "data set", source) from e


def load_split(source: str, split: str, field: str = "data.train_split"):
    """One split (slicing like 'train[:1%]' allowed) as a datasets.Dataset; `field` names the setting
    that asked for it (data.train_split, ...) in the error for a slice that selects nothing."""
    from datasets import load_dataset

    builder, files = _data_files(source)
    try:
        if files is None:
            ds = load_dataset(builder, split=split)
        else:
            ds = load_dataset(builder, data_files=files, split=split)
    except LlamaLoraError:
        raise
    except Exception as e:
        if isinstance(e, ValueError) and "corresponds to no data" in str(e):
            raise _empty_slice(source, split, field) from e
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise LlamaLoraError(f"Split '{split}' is not valid for data.source '{source}': {e}") from e
        if files is not None:
            where = _first_bad_json(files.values()) or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise LlamaLoraError(
                f"Could not read data.source '{source}' ({where}). "
                "Check that every line/row is valid JSON/Parquet with the instruction/input/output columns."
            ) from e
        if isinstance(e, ValueError):
            raise LlamaLoraError(f"Could not read data.source '{source}' split '{split}': {e}") from e
        from llama_lora.model import hub_error

        raise hub_error(e, "data set", source) from e
    if len(ds) == 0 and "[" in split:
        raise _empty_slice(source, split, field)
    return ds


def _empty_slice(source: str, split: str, field: str) -> LlamaLoraError:
    """A slice that selects no rows is the setting's fault, not the data file's: say how many it had."""
    name = split.split("[", 1)[0]
    try:
        rows = f"has {len(load_split(source, name))} rows"
    except LlamaLoraError:
        rows = "could not be read either"
    return LlamaLoraError(
        f"{field} '{split}' selects no rows of data.source '{source}': its '{name}' split {rows}, and the slice "
        f"[{split.split('[', 1)[1]} is empty (a percentage of too few rows, or a start at or past the end). Widen "
        f"it, e.g. {field}={name} or '{field}=\"{name}[:90%]\"' (Hydra needs the quotes around a slice)."
    )


def _first_bad_json(files) -> str | None:
    """'<file> line N: <problem>' for the first unreadable JSON(L) record (run only after a failure)."""
    for f in map(Path, files):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return f"{f}: {e}"
        if not text.strip():
            return f"{f} is empty"
        if f.suffix.lower() == ".json" and text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{f} line {e.lineno}: {e.msg}"
        elif f.suffix.lower() in (".json", ".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    if line.strip() and not isinstance(json.loads(line), dict):
                        return f"{f} line {n}: a record must be a JSON object"
                except json.JSONDecodeError as e:
                    return f"{f} line {n}: {e.msg}"
    return None


def load_train_eval(cfg: DataConfig, seed: int):
    """(train, eval) datasets: the named eval split, the data set's 'validation', or a held-out share."""
    train = check_text_columns(load_split(cfg.source, cfg.train_split, "data.train_split"), cfg, cfg.train_split)
    if cfg.eval_split is not None:
        return train, check_text_columns(load_split(cfg.source, cfg.eval_split, "data.eval_split"), cfg, cfg.eval_split)
    if "validation" in available_splits(cfg.source):
        return train, check_text_columns(load_split(cfg.source, "validation"), cfg, "validation")
    if len(train) < 2:
        raise LlamaLoraError(f"data.train_split '{cfg.train_split}' has {len(train)} rows; need at least 2.")
    parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def load_test(cfg: DataConfig, seed: int):
    """The held-out split eval/baseline use: test_split, else 'test', else the training eval split."""
    if cfg.test_split is not None:
        split, ds = cfg.test_split, load_split(cfg.source, cfg.test_split, "data.test_split")
    elif "test" in available_splits(cfg.source):
        split, ds = "test", load_split(cfg.source, "test")
    else:
        split, ds = "held-out share of " + cfg.train_split, load_train_eval(cfg, seed)[1]
    return check_text_columns(ds, cfg, split, extra=("task",))  # `task` groups eval's exact match


# ----------------------------------------------------------------------------------------------------
# Row values -> text: the one place a value of the data (or of an infer input file) becomes a string.

_TEXT_DTYPES = frozenset({"string", "large_string", "string_view", "null", "int8", "int16", "int32", "int64",
                          "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"})
_preview = reprlib.Repr()
_preview.maxstring = _preview.maxother = 40
_preview.maxlist = _preview.maxtuple = _preview.maxdict = 2
_preview.maxlevel = 2
DATA_ADVICE = ("Each instruction/input/output value must be a string (numbers are converted); fix the data, "
               "or map a text column with data.columns.{key}=....")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a value of type {type(value).__name__}"


def field_text(value: Any, column: str, row: int | None = None, where: str = "The data",
               unit: str = "row", advice: str = DATA_ADVICE, key: str | None = None, label: str = "column") -> str:
    """`value` as text: a string as is, a number as str(number), None (or NaN) as "" (a missing value).

    Anything else (list, dict, bytes, bool, ...) is an error naming where, the row, the column and the
    type: str() would silently train on its Python repr. Cheap for strings, as it runs once per value.
    """
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return "" if value != value else str(value)  # NaN: how pandas/CSV spell a missing cell
    at = f"{where}, {unit} {row}" if row is not None else where
    raise LlamaLoraError(
        f"{at}: {label} '{column}' holds {_kind(value)} ({_preview.repr(value)}), not text. "
        + advice.replace("{key}", key or "output")
    )


def _role_columns(cfg: DataConfig) -> dict[str, str]:
    """{column name in the data: its data.columns key}."""
    cols = cfg.columns
    return {cols.instruction: "instruction", cols.input: "input", cols.output: "output"}


def check_text_columns(ds, cfg: DataConfig, split: str, extra: tuple[str, ...] = ()):
    """Refuse (naming the first bad row, in the split's own order) a text column that holds non-text values.

    Arrow gives each column one type, so a string or number column needs no look at its rows; only a
    column of another type (lists, structs, bytes, bools, or mixed JSON) is scanned, up to its first bad value.
    """
    roles = _role_columns(cfg) | {c: None for c in extra if c not in _role_columns(cfg)}
    features = getattr(ds, "features", None) or {}
    where = f"data.source '{cfg.source}', split '{split}'"
    for column, key in roles.items():
        feature = features.get(column)
        if feature is None or getattr(feature, "dtype", None) in _TEXT_DTYPES or type(feature).__name__ == "ClassLabel":
            continue
        for i, row in enumerate(ds.select_columns([column])):
            field_text(row[column], column, i + 1, where, key=key)
    return ds


# ----------------------------------------------------------------------------------------------------
# Prompt formatting: the same object is saved into the run directory and reused by infer/eval.


@dataclass(frozen=True)
class PromptFormat:
    kind: str  # "chat" | "alpaca"
    system_prompt: str | None = None
    # The date chat templates that read one (Llama 3.x's `date_string`, else `strftime_now`) write into every
    # prompt: fixed at training and saved here, so a prompt served on another day is the one trained on.
    # None (runs saved before the field existed) leaves the template to its own default.
    date_string: str | None = None

    @classmethod
    def choose(cls, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        kind = cfg.prompt_format
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if kind == "auto":
            kind = "chat" if has_template else "alpaca"
        if kind == "chat" and not has_template:
            raise LlamaLoraError(
                "data.prompt_format=chat but the tokenizer has no chat template (a base model?). "
                "Use data.prompt_format=alpaca or auto."
            )
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        if kind == "chat" and "strftime_now" in template and "date_string" not in template:
            log.warning("The tokenizer's chat template writes today's date (strftime_now) with no date_string "
                        "variable to fix it: prompts will differ from training on another day. Give the tokenizer "
                        "a template that reads date_string, or use data.prompt_format=alpaca.")
        return cls(kind=kind, system_prompt=cfg.system_prompt,
                   date_string=cfg.chat_template_date if kind == "chat" else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def messages(self, user: str, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + list(history or []) + [{"role": "user", "content": user}]

    def apply_template(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                       add_generation_prompt: bool = False) -> str:
        """The chat template rendered as text with this format's fixed date (every consumer renders through here)."""
        extra = {"date_string": self.date_string} if self.date_string is not None else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)

    def prompt(self, tokenizer: PreTrainedTokenizerBase, instruction: str, input: str = "",
               history: list[dict[str, str]] | None = None) -> str:
        """The text a model sees before it answers (training masks exactly this part)."""
        if self.kind == "chat":
            user = instruction if not input else f"{instruction}\n\n{input}"
            return self.apply_template(tokenizer, self.messages(user, history), add_generation_prompt=True)
        body = (ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT).format(instruction=instruction, input=input)
        return (tokenizer.bos_token or "") + body

    def render(self, tokenizer: PreTrainedTokenizerBase, instruction: str, input: str, output: str) -> tuple[str, str]:
        """(prompt, answer) whose concatenation is the full training text; the answer ends with EOS."""
        prompt = self.prompt(tokenizer, instruction, input)
        if self.kind == "chat":
            user = instruction if not input else f"{instruction}\n\n{input}"
            full = self.apply_template(tokenizer, self.messages(user) + [{"role": "assistant", "content": output}])
            if not full.startswith(prompt):
                raise LlamaLoraError(
                    "The tokenizer's chat template does not render the prompt as a prefix of the full "
                    "conversation, so the response cannot be isolated for the loss. Use data.prompt_format=alpaca."
                )
            return prompt, full[len(prompt):]
        return prompt, output + tokenizer.eos_token


# ----------------------------------------------------------------------------------------------------
# Tokenization with the label mask.


@dataclass
class DataStats:
    rows: int = 0
    dropped_empty: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    max_length: int = 0
    empty_row_indices: list[int] = field(default_factory=list)

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.examples} examples from {self.rows} rows, {self.tokens} tokens "
            f"({self.response_tokens} trained), max length {self.max_length}; "
            f"dropped {self.dropped_empty} rows with a missing/empty instruction or output"
            + (f" (rows {self.empty_row_indices[:5]})" if self.empty_row_indices else "")
            + f", truncated {self.truncated}, dropped {self.dropped_no_response} with no response left after truncation"
        )


def tokenize_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenize prompt+answer as one text (as the model sees it) and mask the prompt's labels."""
    full = prompt + answer
    if tokenizer.is_fast:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        # A token belongs to the prompt if it starts inside the prompt text.
        n_prompt = sum(1 for start, _ in enc["offset_mapping"] if start < len(prompt))
    else:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = p + tokenizer(answer, add_special_tokens=False)["input_ids"]
        n_prompt = len(p)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return ids, labels


def check_positions(cfg: DataConfig, model_config) -> None:
    """data.max_seq_length must fit the positions the model was trained for: beyond them RoPE meets angles
    it never saw, and training on them teaches garbage without an error."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.max_seq_length > positions:
        raise LlamaLoraError(
            f"data.max_seq_length={cfg.max_seq_length} is above the model's {positions} positions "
            f"(max_position_embeddings in its config.json): tokens past {positions} would train on positions the "
            f"model never learned. Set data.max_seq_length={positions} or less."
        )


def max_value_chars(max_seq_length: int) -> int:
    """A value longer than this is cut before tokenizing (a 30 MB cell took a minute): no token spans
    anywhere near 400 characters, so the cut text still gives more than max_seq_length tokens and the
    kept (truncated) tokens are the same; values shorter than this are untouched."""
    return 400 * max_seq_length


def tokenize_dataset(ds, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat,
                     name: str = "data") -> tuple[list[dict[str, list[int]]], DataStats]:
    """Every usable row -> {'input_ids', 'labels'}; what was dropped or cut is counted, never hidden."""
    cols = cfg.columns
    missing = [c for c in (cols.instruction, cols.output) if c not in ds.column_names]
    if missing:
        raise LlamaLoraError(
            f"The {name} data has no column(s) {missing}; it has {ds.column_names}. "
            "Map yours with data.columns.instruction=..., data.columns.input=..., data.columns.output=...."
        )
    stats = DataStats(rows=len(ds))
    examples = []
    where, limit = f"data.source '{cfg.source}', {name} split", max_value_chars(cfg.max_seq_length)
    roles = [(cols.instruction, "instruction"), (cols.input, "input"), (cols.output, "output")]
    for i, row in enumerate(ds):
        # [:limit] returns a shorter string itself, unchanged; a longer one is cut (see max_value_chars).
        instruction, inp, output = (field_text(row.get(c), c, i + 1, where, key=k)[:limit].strip() for c, k in roles)
        if not instruction or not output:
            stats.dropped_empty += 1
            stats.empty_row_indices.append(i)
            continue
        prompt, answer = fmt.render(tokenizer, instruction, inp, output)
        ids, labels = tokenize_example(tokenizer, prompt, answer)
        if len(ids) > cfg.max_seq_length:
            stats.truncated += 1
            ids, labels = ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped_no_response += 1
                continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.tokens += len(ids)
        stats.response_tokens += sum(label != IGNORE_INDEX for label in labels)
        stats.max_length = max(stats.max_length, len(ids))
    stats.examples = len(examples)
    if stats.dropped_empty:
        log.warning("%s: dropped %d rows with a missing or empty instruction/output (first: %s)",
                    name, stats.dropped_empty, stats.empty_row_indices[:5])
    if not examples:
        raise LlamaLoraError(
            f"The {name} data has no usable example: {stats.summary(name)}. "
            + ("Raise data.max_seq_length." if stats.dropped_no_response else "Check the data and data.columns.")
        )
    log.info(stats.summary(name))
    return examples, stats


# ----------------------------------------------------------------------------------------------------
# Batching.


def collate_padded(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic right padding to the longest example of the batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Padding-free: one row, position_ids restarting at 0 per example, no attention_mask.

    transformers reads the restarts in position_ids as example boundaries (block-diagonal causal mask
    for SDPA/eager, varlen kernels for FlashAttention2), so no example attends to another.
    """
    ids, labels, pos = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        # The first token of an example must not be predicted from the previous example's last token.
        labels += [IGNORE_INDEX] + e["labels"][1:]
        pos += list(range(n))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
    }


def make_collate(packing: bool, pad_id: int):
    if packing:
        return collate_packed
    return lambda examples: collate_padded(examples, pad_id)
