"""`llama-lora infer`: talk to a fine-tuned run (base + adapter) or a merged model.

  llama-lora infer "Reverse the word.\n\nhello"          one answer, streamed
  llama-lora infer                                         interactive chat (history kept; /exit ends)
  llama-lora infer --input-file in.jsonl --output-file out.jsonl   a file, in left-padded batches

The run directory is infer.run_dir (or `run_dir=...`), by default the latest finished run; prompts are
formatted with the run's saved prompt.json and tokenizer, so inference formats exactly as training did.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers import TextStreamer

from llama_lora import artifacts, runs
from llama_lora import data as data_lib
from llama_lora.config.schema import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.generation import describe, generate, generate_batched, generation_config
from llama_lora.runs import Loaded

log = logging.getLogger("llama_lora.infer")


def run(cfg: Config, prompt: str | None = None, input_file: str | None = None, output_file: str | None = None,
        show_prompt: bool = False, stdin: TextIO | None = None, stdout: TextIO | None = None, prompt_input: str = ""):
    """One prompt -> its answer; an input file -> list of records; neither -> interactive chat."""
    stdout = stdout or sys.stdout
    if prompt is not None and not prompt.strip():  # before loading anything
        raise LlamaLoraError("The prompt is empty. Give the instruction as the argument, e.g. "
                             "llama-lora infer \"Reverse the word.\" --input hello, or omit it to chat.")
    records = read_prompts(Path(input_file)) if input_file is not None else None  # before loading anything
    if output_file is not None:
        check_output_file(Path(output_file), Path(input_file) if input_file else None)
    loaded = runs.load(cfg)
    torch.manual_seed(cfg.training.seed)  # reproducible sampling
    set_by_user = [k for k in ("do_sample", "temperature", "top_p") if getattr(cfg.infer, k) is not None]
    log.info(describe(_gen(loaded, cfg), set_by_user))
    if input_file is not None:
        return answer_file(loaded, cfg, Path(input_file), Path(output_file) if output_file else None, stdout,
                           records)
    if prompt is not None:
        return answer(loaded, cfg, prompt, None, show_prompt, stdout, prompt_input)
    return chat(loaded, cfg, stdin or sys.stdin, stdout, show_prompt)


def _gen(loaded: Loaded, cfg: Config, max_new_tokens: int | None = None):
    ic = cfg.infer
    return generation_config(loaded.model, loaded.tokenizer, max_new_tokens or ic.max_new_tokens, ic.do_sample,
                             ic.temperature, ic.top_p)


def room_to_answer(loaded: Loaded, prompts: list[str], max_new_tokens: int, where: str = "The prompt") -> int:
    """max_new_tokens, or less where the longest prompt leaves fewer of the model's positions; a prompt
    that fills them all is an error (transformers would only warn and answer garbage)."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if not positions:
        return max_new_tokens
    longest = max(len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    if longest >= positions:
        raise LlamaLoraError(
            f"{where} is {longest:,} tokens once formatted, and the model has {positions:,} positions in all "
            f"(max_position_embeddings): no room left for an answer. Shorten it below {positions:,} tokens."
        )
    if longest + max_new_tokens > positions:
        log.warning("%s is %d tokens: the answer is limited to the %d positions left of the model's %d "
                    "(infer.max_new_tokens=%d).", where, longest, positions - longest, positions, max_new_tokens)
        return positions - longest
    return max_new_tokens


def format_turn(loaded: Loaded, user: str, history: list[dict[str, str]] | None, input: str = "") -> str:
    """The prompt for `user` after `history`, in the run's format.

    Chat templates render the history themselves; for the Alpaca format the earlier exchanges are
    concatenated (each rendered as in training: prompt, answer, eos) before the new prompt.
    """
    fmt, tok = loaded.fmt, loaded.tokenizer
    if fmt.kind == "chat" or not history:
        return fmt.prompt(tok, user, input, history=history)
    bos = tok.bos_token or ""
    text = bos
    for u, a in zip(history[0::2], history[1::2]):
        text += fmt.prompt(tok, u["content"]).removeprefix(bos) + a["content"] + tok.eos_token
    return text + fmt.prompt(tok, user, input).removeprefix(bos)


def answer(loaded: Loaded, cfg: Config, user: str, history: list[dict[str, str]] | None = None,
           show_prompt: bool = False, stdout: TextIO | None = None, input: str = "") -> str:
    """Generate one reply, streaming it to stdout as it is produced."""
    stdout = stdout or sys.stdout
    prompt = format_turn(loaded, user, history, input)
    if show_prompt:
        print(f"--- prompt ---\n{prompt}\n--- end prompt ---", file=sys.stderr, flush=True)
    streamer = _Streamer(loaded.tokenizer, stdout)
    room = room_to_answer(loaded, [prompt], cfg.infer.max_new_tokens)
    reply = generate(loaded.model, loaded.tokenizer, [prompt], _gen(loaded, cfg, room), streamer=streamer)[0]
    print(file=stdout, flush=True)
    return reply


class _Streamer(TextStreamer):
    """TextStreamer that writes to a given stream (stdout by default) and skips special tokens."""

    def __init__(self, tokenizer, stream: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.stream.write(text)
        self.stream.flush()


def chat(loaded: Loaded, cfg: Config, stdin: TextIO, stdout: TextIO, show_prompt: bool = False) -> list[dict]:
    """Read user turns line by line (a terminal or a pipe); the conversation is kept until /reset."""
    tty = stdin.isatty()
    print(f"Chatting with {loaded.target} ({'base + adapter' if loaded.has_adapter else 'merged model'}). "
          "/reset clears the history, /exit or Ctrl-D ends.", file=sys.stderr, flush=True)
    history: list[dict[str, str]] = []
    while True:
        if tty:
            print(">>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        user = line.strip()
        if not user:
            continue
        if user in ("/exit", "/quit"):
            break
        if user == "/reset":
            history = []
            continue
        try:
            reply = answer(loaded, cfg, user, history, show_prompt, stdout)
        except LlamaLoraError as e:  # e.g. a turn too long for the model: say so, keep the conversation
            print(f"error: {e} (/reset clears the history)", file=sys.stderr, flush=True)
            continue
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.strip()}]
    return history


_PROMPT_ADVICE = ("Each 'instruction', 'input' and 'prompt' must be a string (numbers are converted), like "
                  '{"instruction": "...", "input": "..."} or {"prompt": "..."}.')


def read_prompts(path: Path) -> list[dict]:
    """JSONL records with `instruction` (+ optional `input`), or `prompt` (the user message)."""
    if not path.is_file():
        raise LlamaLoraError(f"--input-file {path} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LlamaLoraError(
            f"--input-file {path} is not UTF-8 text: byte {e.start} (line {line}) is 0x{data[e.start]:02x}. Give a "
            "JSONL file: one JSON object per line, in UTF-8.") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaLoraError(f"{path} line {n} is not valid JSON ({e.msg}). Write one JSON object per line.") from e
        if not isinstance(rec, dict) or not ("instruction" in rec or "prompt" in rec):
            raise LlamaLoraError(
                f"{path} line {n} has neither an 'instruction' nor a 'prompt' field. Each line must be like "
                '{"instruction": "...", "input": "..."} or {"prompt": "..."}.'
            )
        # The data's rule (data.field_text): strings as is, numbers converted, null missing, anything else an error.
        texts = {k: data_lib.field_text(rec[k], k, n, str(path), unit="line", advice=_PROMPT_ADVICE,
                                         label="field")
                 for k in ("instruction", "input", "prompt") if k in rec}
        for k, v in texts.items():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:  # a JSON escape such as \ud800: half of an emoji, cut off
                raise LlamaLoraError(
                    f"{path} line {n}: the {k} holds an unpaired surrogate (\\u{ord(v[e.start]):04x} at character "
                    f"{e.start}), which is not text: half of a character that was cut off. Fix that line.") from None
        if not (texts.get("instruction", "").strip() or texts.get("prompt", "").strip()):
            field = "prompt" if "prompt" in rec else "instruction"
            raise LlamaLoraError(
                f"{path} line {n}: the {field} is empty. Give each line a non-empty 'instruction' (+ optional "
                "'input') or 'prompt'."
            )
        records.append(rec | {k: v for k, v in texts.items() if rec[k] is not None})
    if not records:
        raise LlamaLoraError(f"--input-file {path} holds no records.")
    return records


def check_output_file(path: Path, input_file: Path | None) -> None:
    """--output-file can be written, before any work: not a folder, not the input, in a writable folder, and
    not a file of the user's (an existing file is replaced only when it is an answers file infer wrote)."""
    if path.is_dir():
        raise LlamaLoraError(f"--output-file {path} is a folder. Name a file, e.g. --output-file {path}/answers.jsonl.")
    if input_file is not None and path.exists() and path.resolve() == input_file.resolve():
        raise LlamaLoraError(f"--output-file {path} is the --input-file: the prompts would be overwritten. Name "
                             "another file for the answers.")
    if path.exists() and not _is_answers_file(path):
        raise LlamaLoraError(
            f"--output-file {path} exists and is not an answers file written by `llama-lora infer` (JSONL records "
            "with a 'response'), so it is not overwritten. Name another file, or move that one away.")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    try:
        artifacts.check_writable(folder)
    except OSError as e:
        raise LlamaLoraError(f"--output-file {path} cannot be written: {folder} is not writable ({e.strerror}). "
                             "Name a file in a writable folder.") from None


def _is_answers_file(path: Path) -> bool:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return all("response" in json.loads(line) for line in lines)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def answer_file(loaded: Loaded, cfg: Config, input_file: Path, output_file: Path | None, stdout: TextIO,
                records: list[dict] | None = None) -> list[dict]:
    records = records if records is not None else read_prompts(input_file)
    prompts = [loaded.fmt.prompt(loaded.tokenizer, str(r.get("instruction") or r["prompt"]), str(r.get("input") or ""))
               for r in records]
    log.info("Answering %d prompts from %s in batches of %d", len(prompts), input_file, cfg.infer.batch_size)
    room = room_to_answer(loaded, prompts, cfg.infer.max_new_tokens, f"The longest prompt of {input_file}")
    replies = generate_batched(loaded.model, loaded.tokenizer, prompts, _gen(loaded, cfg, room), cfg.infer.batch_size)
    out = [r | {"response": a.strip()} for r, a in zip(records, replies)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if output_file is None:
        stdout.write(text)
    else:
        artifacts.write_text(output_file, text)
        log.info("Wrote %d answers to %s", len(out), output_file)
    return out


if __name__ == "__main__":
    from llama_lora.cli import main

    main(["infer", *sys.argv[1:]])
