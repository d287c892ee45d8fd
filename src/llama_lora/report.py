"""Experiment reports: the best run, summary.{json,csv,md}, the console table and the plots.

What `llama-lora experiment` writes beside its runs (see experiment.py); every file is written
atomically, so a reader never sees half a summary.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llama_lora import artifacts
from llama_lora.artifacts import RunDir
from llama_lora.config.schema import Config

log = logging.getLogger("llama_lora.experiment")

COLUMNS = ("run", "status", "overrides", "train_loss", "eval_loss", "exact_match", "trainable_params",
           "tokens_per_second", "peak_memory_mb", "wall_time_s", "error", "run_dir")
LOWER_IS_BETTER = {"eval_loss": True, "exact_match": False}


def run_name(overrides: tuple[str, ...]) -> str:
    name = ",".join(o.lstrip("+~") for o in overrides)
    return "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in name)[:200] or "run"



def best_run(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r["status"] in ("finished", "skipped") and _number(r.get(metric)) is not None]
    if not scored:
        return None
    # Ties (e.g. every run at 0% exact match early on) go to the lower eval loss.
    sign = 1 if LOWER_IS_BETTER[metric] else -1
    return min(scored, key=lambda r: (sign * r[metric], _number(r.get("eval_loss")) or math.inf))


def tied_runs(rows: list[dict[str, Any]], metric: str, best: dict[str, Any] | None) -> list[str]:
    """Names of the runs whose compared metric equals the best run's, when more than one does; else []."""
    if best is None:
        return []
    tied = [r["run"] for r in rows if r["status"] in ("finished", "skipped") and _number(r.get(metric)) is not None
            and math.isclose(r[metric], best[metric], rel_tol=1e-9, abs_tol=1e-12)]
    return tied if len(tied) > 1 else []


def tie_note(summary: dict[str, Any]) -> str:
    tied = summary.get("tied") or []
    return (f"a tie on {summary['metric']} between {', '.join(tied)} (marked =; * breaks it by the lower eval loss)"
            if tied else "")


def resolve_metric(cfg: Config, rows: list[dict[str, Any]]) -> str:
    if cfg.experiment.metric != "auto":
        return cfg.experiment.metric
    return "exact_match" if any(r.get("exact_match") is not None for r in rows) else "eval_loss"


def write_tables(exp_dir: Path, rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """summary.json / .csv / .md (atomically: a reader never sees half a file)."""
    metric = resolve_metric(cfg, rows)
    best = best_run(rows, metric)
    summary = {
        "experiment": exp_dir.name, "dir": str(exp_dir), "metric": metric,
        "direction": "minimize" if LOWER_IS_BETTER[metric] else "maximize",
        "best": best["run"] if best else None,
        # Runs sharing the best value of the compared metric: a tie is reported as one (best then only breaks
        # it by the lower eval loss).
        "tied": tied_runs(rows, metric, best),
        "mode": "search" if cfg.experiment.search.n_trials else "grid",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": rows,
    }
    artifacts.write_json(exp_dir / "summary.json", summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r[k] for k in COLUMNS} for r in rows)
    artifacts.write_text(exp_dir / "summary.csv", buf.getvalue())
    artifacts.write_text(exp_dir / "summary.md", to_markdown(summary))
    return summary


def summarize(exp_dir: Path, rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    summary = write_tables(exp_dir, rows, cfg)
    summary["plots"] = plot(exp_dir, rows, summary["metric"])
    print_table(summary)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    log.info("Experiment %s: %d runs, %d failed%s; summary in %s", exp_dir.name, len(rows), len(failed),
             f" ({', '.join(failed)})" if failed else "", exp_dir)
    return summary


_HEADERS = {"run": "run", "status": "status", "overrides": "overrides", "train_loss": "train loss",
            "eval_loss": "eval loss", "exact_match": "exact match", "trainable_params": "trainable",
            "tokens_per_second": "tokens/s", "peak_memory_mb": "peak MB", "wall_time_s": "wall s", "error": "error"}


def _cell(key: str, v: Any) -> str:
    if v is None or v == "":
        return "" if key == "error" else "-"
    if key in ("train_loss", "eval_loss"):
        return f"{v:.4f}"
    if key == "exact_match":
        return f"{100 * v:.1f}%"
    if key == "trainable_params":
        return f"{v:,}"
    if key in ("tokens_per_second", "peak_memory_mb", "wall_time_s"):
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    return str(v)


def print_table(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 140))
    table = Table(title=f"Experiment {summary['experiment']}: {len(summary['runs'])} runs "
                        f"({summary['metric']}, best marked *)")
    # A sweep names each run after its overrides: the overrides column would only repeat the name.
    keys = [k for k in _HEADERS if k != "overrides" or any(
        run_name(tuple(r["overrides"].split())) != r["run"] for r in summary["runs"])]
    for key in keys:
        numeric = key not in ("run", "status", "overrides", "error")
        table.add_column(_HEADERS[key], justify="right" if numeric else "left", overflow="fold",
                         no_wrap=numeric or key in ("run", "status"), ratio=2 if key == "error" else None)
    for r in summary["runs"]:
        style = {"failed": "red", "interrupted": "yellow", "config changed": "yellow", "skipped": "dim"}.get(r["status"])
        cells = [_cell(k, r.get(k)) for k in keys]
        cells[0] += " *" if r["run"] == summary["best"] else " =" if r["run"] in (summary.get("tied") or []) else ""
        table.add_row(*cells, style=style)
    console.print(table)
    if summary.get("tied"):
        console.print(tie_note(summary).capitalize() + ".")
    console.print(f"Summary and plots in {summary['dir']}")


def to_markdown(summary: dict[str, Any]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"# Experiment {summary['experiment']}", "",
             f"Compared metric: **{summary['metric']}** ({summary['direction']}); best run: "
             f"**{summary['best'] or '-'}**" + (f"; {tie_note(summary)}" if summary.get("tied") else "") + ".", "",
             "| " + " | ".join(_HEADERS.values()) + " |",
             "|" + "|".join("---:" if k not in ("run", "status", "overrides", "error") else "---" for k in _HEADERS) + "|"]
    for r in summary["runs"]:
        lines.append("| " + " | ".join(esc(_cell(k, r.get(k))) for k in _HEADERS) + " |")
    lines += ["", "![eval loss](eval_loss.png)", "", f"![{summary['metric']}](metric.png)", ""]
    return "\n".join(lines)


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def eval_loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, eval losses) from the run's TensorBoard events; from metrics.json (before/after) without them."""
    tb = run_dir / "tensorboard"
    if tb.is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # "No path found after ..." per file
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        if "eval/loss" in acc.Tags().get("scalars", []):
            events = {e.step: e.value for e in acc.Scalars("eval/loss")}  # a resumed run may repeat a step
            return sorted(events), [events[s] for s in sorted(events)]
    m = RunDir(run_dir).metrics
    if m.is_file():
        data = artifacts.read_json(m)
        if data.get("eval_loss") is not None:
            return [0, data["steps"]], [data["eval_loss_before"], data["eval_loss"]]
    return [], []


def plot(exp_dir: Path, rows: list[dict[str, Any]], metric: str) -> dict[str, str]:
    """eval_loss.png (every finished run's curve) and metric.png (bars); plot_data.json holds the numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless: no display, no pyplot state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    done = [r for r in rows if r["status"] in ("finished", "skipped")]
    curves = {}
    for r in done:
        steps, values = eval_loss_curve(Path(r["run_dir"]))
        if steps:
            curves[r["run"]] = {"steps": steps, "values": values}
    bars = {r["run"]: r[metric] for r in done if _number(r.get(metric)) is not None}

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, c in curves.items():
        ax.plot(c["steps"], c["values"], marker="o", markersize=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="eval loss", title=f"{exp_dir.name}: eval loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    _save_png(fig, exp_dir / "eval_loss.png")

    fig = Figure(figsize=(max(6, 1.1 * len(bars) + 2), 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(bars)
    values = [100 * bars[n] if metric == "exact_match" else bars[n] for n in names]
    best = best_run(done, metric)
    colors = ["tab:green" if best and n == best["run"] else "tab:blue" for n in names]
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
    label = "exact match (%), higher is better" if metric == "exact_match" else "eval loss, lower is better"
    if metric == "exact_match":
        ax.set_ylim(0, 105)
    ax.set(ylabel=label, title=f"{exp_dir.name}: final {metric.replace('_', ' ')} per run")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.1f}" if metric == "exact_match" else f"{v:.3f}", (i, v), ha="center", va="bottom",
                    fontsize="small")
    _save_png(fig, exp_dir / "metric.png")

    artifacts.write_json(exp_dir / "plot_data.json", {"eval_loss": curves, "metric": {"name": metric, "values": bars}})
    return {"eval_loss": str(exp_dir / "eval_loss.png"), "metric": str(exp_dir / "metric.png"),
            "data": str(exp_dir / "plot_data.json")}


def _save_png(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
