"""benchmarks/bench.py --quick runs every method end to end and writes its JSON and Markdown table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_bench_quick_runs_all_methods(tmp_path):
    pytest.importorskip("trl")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--threads", "1", "--methods", "a,b,c,d,e,f",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench-quick.json").read_text())
    rows = {(r["method"][:3], r["adapter"]): r for r in report["rows"]}
    assert set(rows) == {(m, a) for m in ("(a)", "(b)", "(c)", "(e)", "(f)") for a in ("lora", "dora")} | {("(d)", "-")}
    for r in rows.values():
        assert r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 and r["effective_mfu"] > 0
        assert len(r["step_seconds"]) == report["warmup_steps"] + report["measured_steps"]
    assert rows[("(b)", "lora")]["ratio_to_trl"] == 1.0
    # The floor runs interleaved in each adapter block; every llama-lora row is timed against its block's.
    floors = [r for r in report["rows"] if r["method"].startswith("(d)")]
    assert sorted(r["block"] for r in floors) == ["dora", "lora"] and all(r["step_vs_floor"] == 1.0 for r in floors)
    assert all(rows[(m, a)]["step_vs_floor"] > 0 for m in ("(a)", "(e)", "(f)") for a in ("lora", "dora"))
    # Every method trained on the same examples: the same non-padding tokens in all (the Trainers
    # shuffle within the run, so per step only llama-lora and the floor agree exactly).
    assert rows[("(a)", "lora")]["step_tokens"] == rows[("(d)", "-")]["step_tokens"]
    assert len({sum(r["step_tokens"]) for r in rows.values()}) == 1
    # The losses are the same objective (mean over response tokens) from the same weights: close.
    assert abs(rows[("(a)", "lora")]["final_loss"] - rows[("(c)", "lora")]["final_loss"]) < 0.5
    assert len(report["planner"]) >= 3
    assert all(abs(p["error"]) < 0.25 for p in report["planner"])  # tiny model: fixed costs weigh more
    assert "forward" in report["profile"] and "backward" in report["profile"]
    table = (tmp_path / "bench-quick.md").read_text()
    assert "| method | adapter | non-padding tokens/s | vs TRL |" in table and "planner (MiB)" in table
