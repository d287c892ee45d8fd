"""examples/quickstart.ipynb runs headless from top to bottom, so the walkthrough cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_quickstart_notebook_runs(tmp_path, embedded_model, embedded_data, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    out = tmp_path / "outputs"
    monkeypatch.setenv("LLAMA_LORA_NOTEBOOK_OUT", str(out))  # the kernel inherits this environment
    monkeypatch.setenv("LLAMA_LORA_NOTEBOOK_STEPS", "10")  # same cells, shorter runs
    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    # "python3" is the kernel of the Python running the tests (ipykernel in the same venv).
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "exact match: base" in text and "best run:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # both plots shown inline

    assert json.loads((out / "quickstart" / "run.json").read_text())["status"] == "finished"
    metrics = json.loads((out / "quickstart" / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (out / "quickstart" / "eval.json").is_file()
    summary = json.loads((out / "compare_lora_dora" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["finished"] * 4
    assert all(r["exact_match"] is not None for r in summary["runs"])  # evaluated: the embedded data is checkable
    assert all(Path(out / "compare_lora_dora" / f).is_file() for f in ("eval_loss.png", "metric.png", "summary.md"))
