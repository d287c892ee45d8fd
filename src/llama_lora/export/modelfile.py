"""The Ollama Modelfile beside an exported GGUF: template in Ollama's Go-template syntax, stops, sampling.

The template is derived, not hand-written per model family: the run's chat template is rendered on
marker messages, the text around each marker becomes that role's prefix/suffix, and the pieces are
accepted only if they rebuild every rendering exactly. A chat template that is not "prefix + content +
suffix" per role (one that inserts dates, tools, or a default system prompt) gets no TEMPLATE line:
Ollama then uses the GGUF's own `tokenizer.chat_template`, and export.json says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_lora.data import ALPACA_NO_INPUT, PromptFormat

_S, _U1, _A1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"


def _render(tokenizer, msgs, gen: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _role_pieces(tokenizer) -> dict[str, str] | None:
    """{bos, user_pre, user_suf, asst_pre, asst_suf, sys_pre, sys_suf, gen} or None if not expressible."""
    u1, a1, u2 = {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}
    try:
        r1, r2 = _render(tokenizer, [u1], False), _render(tokenizer, [u1, a1], False)
        r3, r3g = _render(tokenizer, [u1, a1, u2], False), _render(tokenizer, [u1, a1, u2], True)
        rs = _render(tokenizer, [{"role": "system", "content": _S}, u1], False)
    except Exception:  # a template that refuses some role order (e.g. requires a system message)
        return None
    if not (r2.startswith(r1) and r3.startswith(r2) and r3g.startswith(r3)):
        return None
    second = r3[len(r2):]
    if _U2 not in second or _U1 not in r1 or _A1 not in r2[len(r1):]:
        return None
    user_pre, user_suf = second.split(_U2)
    head, tail = r1.split(_U1)
    if not head.endswith(user_pre) or tail != user_suf:
        return None
    bos = head[: len(head) - len(user_pre)]
    asst_pre, asst_suf = r2[len(r1):].split(_A1)
    p = {"bos": bos, "user_pre": user_pre, "user_suf": user_suf, "asst_pre": asst_pre, "asst_suf": asst_suf,
         "gen": r3g[len(r3):], "sys_pre": "", "sys_suf": ""}
    if _S in rs and rs.startswith(bos) and rs.endswith(r1[len(bos):]):
        p["sys_pre"], p["sys_suf"] = rs[len(bos): len(rs) - len(r1) + len(bos)].split(_S)
    else:
        return None
    # Accept only if the pieces rebuild every rendering exactly.
    build = lambda turns: bos + "".join(p[f"{r}_pre"] + c + p[f"{r}_suf"] for r, c in turns)  # noqa: E731
    if (build([("user", _U1)]) != r1 or build([("user", _U1), ("asst", _A1)]) != r2
            or build([("user", _U1), ("asst", _A1), ("user", _U2)]) + p["gen"] != r3g
            or build([("sys", _S), ("user", _U1)]) != rs):
        return None
    return p


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')  # Go templates have no escape for "{{" but a string action


def ollama_template(tokenizer, fmt: PromptFormat, add_bos: bool) -> str | None:
    """The run's prompt format as an Ollama TEMPLATE (None: not expressible, Ollama's GGUF default applies).

    `add_bos`: whether llama.cpp adds BOS itself when tokenizing (then the template must not write it too)."""
    bos_text = tokenizer.bos_token or ""
    if fmt.kind != "chat":
        body = _go_literal(ALPACA_NO_INPUT).replace("{instruction}", "{{ .Prompt }}")
        return ("" if add_bos else _go_literal(bos_text)) + body + "{{ .Response }}"
    p = _role_pieces(tokenizer)
    if p is None:
        return None
    bos = p["bos"]
    if add_bos and bos_text and bos.startswith(bos_text):
        bos = bos[len(bos_text):]
    g = {k: _go_literal(v) for k, v in p.items()}
    return (
        _go_literal(bos)
        # no "{{-" trimming: it would eat whitespace that belongs to the pieces (e.g. a suffix's newline)
        + '{{ range .Messages }}'
        + '{{ if eq .Role "system" }}' + g["sys_pre"] + "{{ .Content }}" + g["sys_suf"]
        + '{{ else if eq .Role "user" }}' + g["user_pre"] + "{{ .Content }}" + g["user_suf"]
        + '{{ else if eq .Role "assistant" }}' + g["asst_pre"] + "{{ .Content }}" + g["asst_suf"]
        + "{{ end }}{{ end }}" + g["gen"]
    )


def sampling_parameters(model_dir: Path, context_length: int | None) -> dict[str, float | int]:
    """Ollama PARAMETERs from the model's generation_config.json (greedy there -> temperature 0)."""
    path = Path(model_dir) / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    params: dict[str, float | int] = {}
    if not gen.get("do_sample", False):
        params["temperature"] = 0.0  # transformers decodes greedily unless do_sample is set
    elif "temperature" in gen:
        params["temperature"] = float(gen["temperature"])
    if gen.get("do_sample", False):
        for hf, ollama in (("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p")):
            if gen.get(hf) is not None:
                params[ollama] = gen[hf]
    if gen.get("repetition_penalty") not in (None, 1.0):
        params["repeat_penalty"] = float(gen["repetition_penalty"])
    if context_length:
        params["num_ctx"] = int(context_length)  # Ollama's default context may exceed what the model was trained on
    return params


def render(gguf_name: str, template: str | None, stops: list[str], params: dict, system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    if template is not None:
        if '"""' in template:
            raise ValueError("template contains triple quotes")
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: the chat template is not expressible as per-role prefix/suffix; Ollama uses the",
                  "# GGUF's tokenizer.chat_template.", ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"
