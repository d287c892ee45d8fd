"""What the source must not carry: this project's issue numbers and merge markers (they belong in commit
messages) and benchmark row ids (the figures live in benchmarks/README.md, cited there by section)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "llama_lora"
FORBIDDEN = {
    # this project's: "issue 15", "(#16)"; an upstream bug cited by its repository ("peft#2368") says why
    # code is the way it is, and stays
    "an issue number": re.compile(r"\b[Ii]ssue #?\d+|\(#\d+\)"),
    "a merge marker": re.compile(r"#\s*-+\s*(added|end)\b"),
    "a benchmark row id": re.compile(r"\brows? \([a-k]\)|\b[SGR]\d{1,2}\b"),
}


def test_source_carries_no_issue_numbers_merge_markers_or_benchmark_row_ids():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "_vendor" in path.parts:  # upstream code, kept byte for byte (tests/unit/test_vendor.py)
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(SRC)}:{n}: {what}: {line.strip()}" for what, rx in FORBIDDEN.items()
                      if rx.search(line)]
    assert not found, "\n".join(found)
