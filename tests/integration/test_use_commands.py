"""infer / eval / baseline / merge through the real CLI.

Fast tests use a run directory made without training (random adapter on the tiny base): they check
the mechanics. The slow ones read the session's real quickstart run: they check the model answers.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_run, run_cli


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_base):
    return make_run(tmp_path_factory.mktemp("runs"), tiny_base, "lora", alpha=512)


def test_infer_answers_one_prompt(fake_run):
    proc = run_cli("infer", "Reverse the word.", "--input", "dog", f"run_dir={fake_run}", "infer.max_new_tokens=6",
                   "--show-prompt")
    assert "Reverse the word.\n\ndog<|eot_id|>" in proc.stderr  # formatted with the run's chat template
    assert proc.stdout.strip()  # the streamed answer


def test_infer_answers_a_jsonl_file_in_batches(fake_run, tmp_path):
    records = [{"instruction": "Reverse the word.", "input": "dog", "id": 1},
               {"prompt": "Say something."},
               {"instruction": "Add the two numbers.", "input": "1 + 2"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_cli("infer", "--input-file", str(src), "--output-file", str(out), f"infer.run_dir={fake_run}",
            "infer.batch_size=2", "infer.max_new_tokens=5")
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "response"} for g in got] == records  # same order, fields kept
    assert all(isinstance(g["response"], str) for g in got) and any(g["response"] for g in got)


def test_interactive_chat_keeps_history(fake_run):
    proc = run_cli("infer", f"run_dir={fake_run}", "infer.max_new_tokens=4", "--show-prompt",
                   stdin="first question\nsecond question\n/exit\n")
    prompts = proc.stderr.split("--- prompt ---")[1:]
    assert len(prompts) == 2
    assert prompts[0].count("first question") == 1 and "second question" not in prompts[0]
    second = prompts[1].split("--- end prompt ---")[0]
    # The second turn is rendered after the first question and the model's first answer.
    assert second.index("first question") < second.index("<|start_header_id|>assistant") < second.index("second question")


# ---- the real quickstart run -------------------------------------------------------------------------


@pytest.mark.slow
def test_baseline_then_eval_side_by_side(quickstart_run):
    n = "data.max_eval_examples=80"  # same cap for both: the settings must match for the cache to apply
    run_cli("baseline", "experiment=quickstart", f"output_dir={quickstart_run.parent}", n)
    cached = json.loads((quickstart_run.parent / "baseline-quickstart.json").read_text())
    proc = run_cli("eval", str(quickstart_run), n)
    assert "Using the cached baseline" in proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "metric" in line)
    assert "base" in header and "fine-tuned" in header and "change" in header
    assert "exact match: overall" in proc.stdout and "Sample generations" in proc.stdout
    result = json.loads((quickstart_run / "eval.json").read_text())
    base, tuned = result["baseline"], result["finetuned"]
    assert base == cached["baseline"] and result["settings"] == cached["settings"]
    assert base["examples"] == tuned["examples"] == 80
    assert tuned["loss"] < 0.6 * base["loss"]
    assert set(tuned["exact_match"]["by_task"]) == {"add", "reverse", "sort", "uppercase"}
    assert sum(tuned["exact_match"]["counts"].values()) == 80


def _reference_answers(run, records):
    """Greedy answers computed independently of llama-lora: plain PEFT + the tokenizer's chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "run.json").read_text())["base_model"])
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    answers = []
    for r in records:
        ids = tok.apply_chat_template([{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


@pytest.mark.slow
def test_infer_and_merged_model_answer_like_plain_peft(quickstart_run, embedded_data, tmp_path):
    records = [json.loads(line) for line in (embedded_data / "test.jsonl").read_text().splitlines()[:6]]
    records = [{"instruction": r["instruction"], "input": r["input"]} for r in records]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    want = _reference_answers(quickstart_run, records)

    run_cli("infer", "--input-file", str(src), "--output-file", str(tmp_path / "a.jsonl"), f"run_dir={quickstart_run}",
            "infer.max_new_tokens=16", "infer.batch_size=4")
    assert [json.loads(x)["response"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == want

    run_cli("merge", str(quickstart_run))
    run_cli("infer", "--input-file", str(src), "--output-file", str(tmp_path / "b.jsonl"),
            f"run_dir={quickstart_run / 'merged'}", "infer.max_new_tokens=16", "infer.batch_size=4")
    assert [json.loads(x)["response"] for x in (tmp_path / "b.jsonl").read_text().splitlines()] == want
