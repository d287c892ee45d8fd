"""A newcomer's first run: prompts identical from training to serving on any day, generation defaults that
follow the model, and a terminal without third-party noise."""

from __future__ import annotations

import datetime as real_datetime
import json
import re

import pytest

from llama_lora import artifacts, runs
from llama_lora.config.load import load_config
from llama_lora.data import PromptFormat

# Meta's Llama-3.2-Instruct chat template (tokenizer_config.json of meta-llama/Llama-3.2-1B-Instruct; also
# llama.cpp's models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja): it writes today's date into the
# system header unless the caller passes `date_string`.
LLAMA_32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def _on_day(monkeypatch, year: int, month: int, day: int) -> None:
    """Make transformers' `strftime_now` (what the template calls for today's date) answer for this day."""
    from transformers.utils import chat_template_utils

    class _Clock(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime(year, month, day, 12, 0, tzinfo=tz)

    monkeypatch.setattr(chat_template_utils, "datetime", _Clock)


@pytest.fixture
def llama32_tokenizer(embedded_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    tok.chat_template = LLAMA_32_TEMPLATE
    return tok


def test_the_clock_really_moves_llama32_prompts(llama32_tokenizer, monkeypatch):
    """Without a fixed date the same prompt differs from one day to the next (what the fix is for)."""
    fmt = PromptFormat(kind="chat")  # a run saved before the date was fixed
    _on_day(monkeypatch, 2026, 12, 1)
    monday = fmt.prompt(llama32_tokenizer, "Reverse the word.", "garden")
    _on_day(monkeypatch, 2027, 3, 15)
    later = fmt.prompt(llama32_tokenizer, "Reverse the word.", "garden")
    assert "Today Date: 01 Dec 2026" in monday and "Today Date: 15 Mar 2027" in later


def test_training_and_inference_prompts_are_equal_on_different_days(llama32_tokenizer, monkeypatch, tmp_path):
    cfg = load_config(["data.system_prompt=Be brief."])
    assert cfg.data.chat_template_date == "26 Jul 2024"  # Llama 3's own default
    _on_day(monkeypatch, 2026, 12, 1)  # training day
    fmt = PromptFormat.choose(cfg.data, llama32_tokenizer)
    trained_prompt, answer = fmt.render(llama32_tokenizer, "Reverse the word.", "garden", "nedrag")
    artifacts.write_json(tmp_path / "prompt.json", fmt.to_dict())  # what train saves into the run

    _on_day(monkeypatch, 2027, 3, 15)  # serving day: infer, eval and serve read the run's prompt.json
    served = runs.read_prompt_format(tmp_path, load_config([]), llama32_tokenizer)
    assert served == fmt
    assert served.prompt(llama32_tokenizer, "Reverse the word.", "garden") == trained_prompt
    assert "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>" in trained_prompt
    assert answer == "nedrag<|eot_id|>"
    assert json.loads((tmp_path / "prompt.json").read_text())["date_string"] == "26 Jul 2024"


def test_the_date_is_configurable(llama32_tokenizer, monkeypatch):
    _on_day(monkeypatch, 2026, 12, 1)
    fmt = PromptFormat.choose(load_config(["data.chat_template_date=01 Jan 2025"]).data, llama32_tokenizer)
    assert "Today Date: 01 Jan 2025\n" in fmt.prompt(llama32_tokenizer, "Hi")


def test_a_template_reading_only_the_clock_is_named(llama32_tokenizer, caplog):
    """A template calling strftime_now without a date_string variable cannot be fixed: train says so."""
    llama32_tokenizer.chat_template = ("{{- bos_token + 'Today: ' + strftime_now('%d %B %Y') + '\\n' }}"
                                       "{%- for m in messages %}{{- m['content'] + '<|eot_id|>' }}{%- endfor %}")
    with caplog.at_level("WARNING", logger="llama_lora.data"):
        PromptFormat.choose(load_config([]).data, llama32_tokenizer)
    assert "writes today's date" in caplog.text and "data.prompt_format=alpaca" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Generation defaults from the model.


def _sampling_model(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9)  # as Llama-3.2-Instruct ships
    return model, AutoTokenizer.from_pretrained(tiny_base)


def test_unset_infer_settings_follow_the_models_generation_config(tiny_base):
    from llama_lora.generation import describe, generation_config

    model, tok = _sampling_model(tiny_base)
    cfg = load_config([])
    gen = generation_config(model, tok, 8, cfg.infer.do_sample, cfg.infer.temperature, cfg.infer.top_p)
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)
    assert tok.convert_tokens_to_ids("<|eot_id|>") in gen.eos_token_id
    line = describe(gen, [])
    assert "sampling (temperature 0.6, top_p 0.9" in line and "model's generation_config" in line

    cfg = load_config(["infer.do_sample=false"])  # an explicit setting wins
    gen = generation_config(model, tok, 8, cfg.infer.do_sample, cfg.infer.temperature, cfg.infer.top_p)
    assert not gen.do_sample and gen.temperature == 1.0
    assert "greedy" in describe(gen, ["do_sample"]) and "infer.do_sample as set" in describe(gen, ["do_sample"])
    cfg = load_config(["infer.temperature=0.2"])
    gen = generation_config(model, tok, 8, cfg.infer.do_sample, cfg.infer.temperature, cfg.infer.top_p)
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.2, 0.9)


def test_greedy_generation_on_a_sampling_model_is_quiet(tiny_base, caplog):
    """eval decodes greedily (the default) on a model whose config samples, without transformers' warning
    that the model's temperature/top_p are ignored."""
    import torch

    from llama_lora.generation import generate, generation_config

    model, tok = _sampling_model(tiny_base)
    gen = generation_config(model, tok, 4)
    assert not gen.do_sample
    with caplog.at_level("WARNING"):
        torch.manual_seed(0)
        a = generate(model, tok, ["<|begin_of_text|>hello"], gen)
        b = generate(model, tok, ["<|begin_of_text|>hello"], gen)
    assert a == b  # greedy: the same answer twice
    assert not [r for r in caplog.records if re.search("generation flags", r.getMessage())]


# ----------------------------------------------------------------------------------------------------
# A clean terminal: every command's output holds no third-party warning or progress bar.

# What third-party noise looks like on our stderr: Python's warnings (with the library's file path),
# transformers' own "[transformers]" warnings, progress bars redrawn with "it/s", and the known messages.
_NOISE = re.compile(r"site-packages|Warning: |\[transformers\]|it/s\]|Loading weights|gemm_4bit|"
                    r"clean_up_tokenization_spaces|generation flags|is_gradient_checkpointing")


def _noise(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if _NOISE.search(line)]


@pytest.mark.slow
def test_every_command_leaves_a_clean_terminal(tmp_path, embedded_model, embedded_data):
    from tests.helpers import run_cli

    out = tmp_path / "outputs"
    short = ["experiment=quickstart", f"output_dir={out}", "training.max_steps=3", "training.eval_every=0",
             "training.save_every=0", "data.max_eval_examples=6", "eval.max_new_tokens=4"]
    run = str(out / "r")
    commands = {
        "validate": ["validate", *short],
        "train": ["train", *short, "run_name=r"],
        "infer": ["infer", "Reverse the word.", "--input", "garden", f"run_dir={run}", "infer.max_new_tokens=4"],
        "eval": ["eval", run],
        "baseline": ["baseline", run],
        "merge": ["merge", run],
        "experiment": ["experiment", *short, "-m", "peft.r=4", "experiment.name=clean"],
    }
    for name, args in commands.items():
        proc = run_cli(*args)
        assert not _noise(proc), f"{name}: {_noise(proc)}"
        if name == "infer":  # the embedded model's generation_config decodes greedily; infer says where from
            assert "Generation: greedy decoding" in proc.stderr and "model's generation_config" in proc.stderr, proc.stderr
