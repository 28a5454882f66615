"""`mbl plot`: one PNG of the training loss, the evaluation curves, tokens/s and the learning rate of one or
more runs, from their `metrics.jsonl`, so that runs can be compared at a glance.

Each run is one colour in every panel; its evaluation metrics differ by line style, the test split is a star.
Rows a later attempt wrote again (a resume from an earlier checkpoint) replace the earlier ones. matplotlib is
imported here only (the `plot` extra), with the Agg backend: no display needed. TensorBoard
(`tensorboard --logdir RUN/tb`) stays for interactive use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher import contract
from launcher.errors import UsageError

STYLES = ["-", "--", ":", "-."]
EVAL_SKIP = ("step", "time", "perplexity")  # perplexity is exp(loss): the loss curve says it on a readable scale


def load_runs(run_dirs: list[tuple[str, Path]]) -> list[tuple[str, dict[tuple[str, int], dict[str, Any]]]]:
    """(label, {(split, step): row}) per run; split "train" for training rows; the last row of a step wins."""
    import json

    runs = []
    for label, run_dir in run_dirs:
        path = run_dir / contract.METRICS_FILE
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"{run_dir}: no metrics to plot ({exc.strerror}: {path})",
                             hint="give run directories (or job names) of runs that have logged steps") from None
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows[(row.get("split", "train"), row["step"])] = row
        if not rows:
            raise UsageError(f"{path} holds no metrics rows yet", hint="wait for the first log_every_steps")
        runs.append((label, rows))
    return runs


def _series(rows: dict[tuple[str, int], dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((step, row[key]) for (s, step), row in rows.items()
                    if s == split and isinstance(row.get(key), (int, float)))
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot(run_dirs: list[tuple[str, Path]], out: Path, dpi: int = 110) -> Path:
    """Write the PNG and return its path."""
    runs = load_runs(run_dirs)
    try:
        import matplotlib
    except ImportError:
        raise UsageError("mbl plot needs matplotlib", hint="pip install 'mbl[plot]' (or: pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_loss, ax_eval), (ax_speed, ax_lr) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, key in ((ax_loss, "loss"), (ax_speed, "tokens_per_s"), (ax_lr, "lr")):
            steps, values = _series(rows, "train", key)
            if steps:
                ax.plot(steps, values, color=color, label=label)
        evals = sorted({(s, k) for (s, _step), row in rows.items() if s != "train"
                        for k, v in row.items() if isinstance(v, (int, float)) and k not in EVAL_SKIP})
        keys = sorted({k for _s, k in evals})
        for split, key in evals:  # a metric has its line style, the test split a star (one point, at the end)
            steps, values = _series(rows, split, key)
            test = split == "test"
            ax_eval.plot(steps, values, color=color, linestyle=STYLES[keys.index(key) % len(STYLES)],
                         marker="*" if test else "o", markersize=10 if test else 3, label=f"{label}: {split} {key}")
    for ax, title in ((ax_loss, "training loss"), (ax_eval, "evaluations"), (ax_speed, "tokens/s"),
                      (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    names = ", ".join(label for label, _rows in runs)
    fig.suptitle(f"mbl: {names}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
