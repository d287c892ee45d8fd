"""infer / eval / baseline / merge through the real CLI.

Fast tests use a run directory made without training (random adapter on the tiny base): they check
the mechanics. The slow ones read the session's real quickstart run: they check the model answers.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.unit._fake_run import make_run


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
def test_eval_table_compares_base_and_fine_tuned(quickstart_run):
    proc = run_cli("eval", str(quickstart_run))
    header = next(line for line in proc.stdout.splitlines() if "metric" in line)
    assert "base" in header and "fine-tuned" in header and "change" in header
    assert "exact match: overall" in proc.stdout and "Sample generations" in proc.stdout
    result = json.loads((quickstart_run / "eval.json").read_text())
    base, tuned = result["baseline"], result["finetuned"]
    assert base["examples"] == tuned["examples"] > 0
    assert tuned["loss"] < base["loss"]
    assert set(tuned["exact_match"]["by_task"]) == {"add", "reverse", "sort", "uppercase"}
    assert json.loads((quickstart_run / "baseline.json").read_text())["baseline"] == base  # cached for next time
