"""The end of a run for people: summary.json as rows of (what, value), in one place.

The trainer prints them as an aligned table at the end of its log (jobs/runtime.py `finish`), so every
backend's log ends readably; `mbl status JOB` shows them as a table for a finished job. The JSON stays in
`<run_dir>/summary.json` for programs. Pure Python: the trainer imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher import contract
from launcher.progress import duration, number, rate


def _metrics(values: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    rows = []
    for key, value in values.items():
        if not isinstance(value, (int, float)):
            continue
        text = number(float(value))
        if baseline and isinstance(baseline.get(key), (int, float)):
            text += f"   (trivial baseline {number(float(baseline[key]))})"
        rows.append((key, text))
    return rows


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: held-out loss and perplexity, or the test metrics against the trivial baseline;
    then the model's path, steps, wall time and speed."""
    rows: list[tuple[str, str]] = []
    if summary.get("kind") == "pretrain":
        if summary.get("heldout_loss") is not None:
            start = summary.get("heldout_loss_start")
            rows.append(("held-out MLM loss", number(summary["heldout_loss"])
                         + (f"   (at the start {number(start)})" if start is not None else "")))
        if summary.get("perplexity") is not None:
            rows.append(("held-out perplexity", number(summary["perplexity"])))
    elif summary.get("kind") == "finetune":
        rows.append(("task", str(summary.get("task", ""))))
        for key, value in summary.items():
            if key.startswith("best_") and key != "best_step" and isinstance(value, (int, float)):
                at = f"   (step {summary['best_step']})" if summary.get("best_step") is not None else ""
                rows.append((key.removeprefix("best_").replace("_", " ", 1) + " (best)", number(value) + at))
        if isinstance(summary.get("test"), dict):
            rows += [(f"test {k}", v) for k, v in _metrics(summary["test"], summary.get("test_baseline"))]
        pre = summary.get("pretrain")
        if isinstance(pre, dict) and pre.get("heldout_loss") is not None:
            rows.append(("pre-training held-out loss", number(pre["heldout_loss"])
                         + (f"   (perplexity {number(pre['perplexity'])})" if pre.get("perplexity") else "")))
    if summary.get("final_dir"):
        rows.append(("model", str(summary["final_dir"])))
    if isinstance(summary.get("onnx"), dict):
        rows += [(f"onnx {k}", str(v)) for k, v in summary["onnx"].items() if not isinstance(v, (dict, list))]
    steps = summary.get("steps")
    if steps is not None:
        tokens = summary.get("tokens")
        rows.append(("steps", f"{steps}" + (f"   ({tokens:,} tokens)" if isinstance(tokens, int) else "")))
    if summary.get("wall_seconds") is not None:
        rows.append(("wall time", duration(summary["wall_seconds"]) + "   (this attempt)"))
    if summary.get("tokens_per_s"):
        rows.append(("speed", f"{rate(summary['tokens_per_s'])} tokens/s"))
    return rows


def summary_text(summary: dict[str, Any], indent: str = "  ") -> list[str]:
    """The rows as aligned text lines (for the trainer's log)."""
    rows = summary_rows(summary)
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_dir) / contract.SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
