"""`mbl results PIPELINE`: per stage, every point's metrics from its summary.json, the best point by the
spec's metric, mean ± std over seeds, and where the best model is.

The best point is chosen by the metric the fine-tune selects its best checkpoint by (`task.metric`, on the
validation split: summary key `best_validation_<metric>`), never by the test split, which is reported beside
it with the task's trivial baseline. A pretrain is ranked by its held-out MLM loss (lower is better). Points
that differ only in `train.seed` form one configuration: its mean and standard deviation (sample, n - 1) over
the seeds that finished.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from launcher.pipeline import SEED_KEY, Pipeline, Point, Stage
from launcher.progress import number
from launcher.summary import read_summary


def _metric(stage: Stage) -> tuple[str, bool]:
    """The stage's selection metric and whether greater is better."""
    task = stage.points[0].spec.task
    if task is None:
        return "heldout_loss", False
    metric = task.best_metric
    greater = task.greater_is_better if task.greater_is_better is not None else metric != "loss"
    return metric, greater


def _point_row(point: Point, metric: str) -> dict[str, Any]:
    summary = read_summary(point.run_dir)
    row: dict[str, Any] = {
        "index": point.index, "point": point.label or point.stage, "overrides": point.overrides,
        "name": point.name, "run_dir": point.run_dir, "finished": summary is not None,
        "value": None, "test": None, "baseline": None, "model": None,
    }
    if summary is None:
        return row
    if point.spec.task is not None:
        found = [v for k, v in summary.items() if k.startswith("best_") and k.endswith("_" + metric)
                 and isinstance(v, (int, float))]
        row["value"] = found[0] if found else None
        row["split"] = next((k.removeprefix("best_").removesuffix("_" + metric) for k in summary
                             if k.startswith("best_") and k.endswith("_" + metric)), None)
        test, base = summary.get("test") or {}, summary.get("test_baseline") or {}
        row["test"] = test.get(metric) if isinstance(test, dict) else None
        row["baseline"] = base.get(metric) if isinstance(base, dict) else None
        row["test_metrics"] = test if isinstance(test, dict) else {}
    else:
        row["value"] = summary.get("heldout_loss")
        row["split"] = "heldout"
        row["perplexity"] = summary.get("perplexity")
    row["model"] = summary.get("final_dir")
    row["steps"] = summary.get("steps")
    return row


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def stage_results(stage: Stage) -> dict[str, Any]:
    metric, greater = _metric(stage)
    rows = [_point_row(p, metric) for p in stage.points]
    done = [r for r in rows if r["value"] is not None]
    best = (max if greater else min)(done, key=lambda r: r["value"]) if done else None
    for r in rows:
        r["best"] = r is best
    groups: dict[str, dict[str, Any]] = {}
    for point, row in zip(stage.points, rows):
        config = {k: v for k, v in point.overrides.items() if k != SEED_KEY}
        key = repr(sorted(config.items()))
        group = groups.setdefault(key, {"overrides": config, "points": [], "values": [], "tests": []})
        group["points"].append(point.index)
        if row["value"] is not None:
            group["values"].append(row["value"])
        if row["test"] is not None:
            group["tests"].append(row["test"])
    spread = []
    for group in groups.values():
        mean, std = _spread(group["values"])
        test_mean, test_std = _spread(group["tests"])
        spread.append({"overrides": group["overrides"], "points": group["points"], "n": len(group["values"]),
                       "mean": mean, "std": std, "test_mean": test_mean, "test_std": test_std})
    return {
        "stage": stage.name, "kind": stage.kind,
        "task": stage.points[0].spec.task.type if stage.points[0].spec.task else None,
        "metric": metric, "greater_is_better": greater, "split": best.get("split") if best else None,
        "points": rows, "best": best, "configs": spread,
        "finished": sum(r["finished"] for r in rows), "total": len(rows),
    }


def results(pipeline: Pipeline) -> dict[str, Any]:
    return {"pipeline": pipeline.name, "path": pipeline.path, "stages": [stage_results(s) for s in pipeline.stages]}


def to_csv(data: dict[str, Any]) -> str:
    """One line per point: stage, point, its overrides, the selection metric, test and baseline, best, model."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["stage", "index", "point", "name", "finished", "metric", "split", "value", "test", "baseline",
                     "best", "model", "run_dir", "overrides"])
    for stage in data["stages"]:
        for r in stage["points"]:
            writer.writerow([stage["stage"], r["index"], r["point"], r["name"], r["finished"], stage["metric"],
                             r.get("split") or "", _plain(r["value"]), _plain(r["test"]), _plain(r["baseline"]),
                             r["best"], r["model"] or "", r["run_dir"],
                             ";".join(f"{k}={v}" for k, v in r["overrides"].items())])
    return out.getvalue()


def _plain(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return number(mean) + (f" ± {number(std)}" if std is not None else "")


def print_tables(data: dict[str, Any], console: Any = None) -> None:
    """The results for people: per stage, a table of points (the best marked), mean ± std per configuration
    over seeds, and the best model's folder."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: don't cut paths to 80 columns
            console = Console(width=max(console.width, 200))
    for stage in data["stages"]:
        metric, split = stage["metric"], stage["split"] or ("validation" if stage["task"] else "heldout")
        shown = f"{split} {metric}" if stage["task"] else "held-out loss"
        better = "higher" if stage["greater_is_better"] else "lower"
        ranked = f"; best by {shown} ({better} is better)" if stage["total"] > 1 else ""
        console.print(f"[bold]{stage['stage']}[/bold]: {stage['task'] or stage['kind']}, {stage['finished']}/"
                      f"{stage['total']} finished{ranked}", highlight=False)
        table = Table(box=None, header_style="bold")
        headers = ["#", "POINT", shown.upper()]
        headers += [f"TEST {metric}".upper(), "TRIVIAL BASELINE"] if stage["task"] else ["PERPLEXITY"]
        for header in [*headers, "", "RUN DIR"]:
            table.add_column(header)
        for r in stage["points"]:
            value = number(r["value"]) if r["value"] is not None else ("" if r["finished"] else "not finished")
            more = [number(r["test"]), number(r["baseline"])] if stage["task"] else [number(r.get("perplexity"))]
            marked = r["best"] and stage["total"] > 1
            table.add_row(str(r["index"]), r["point"], value, *more, "best" if marked else "", r["run_dir"],
                          style="bold green" if marked else None)
        console.print(table)
        if any(len(c["points"]) > 1 for c in stage["configs"]):
            seeds = Table(box=None, header_style="bold")
            for header in ("CONFIG", "SEEDS", f"{shown} MEAN ± STD".upper(), "TEST MEAN ± STD"):
                seeds.add_column(header)
            for c in stage["configs"]:
                what = ", ".join(f"{k}={v}" for k, v in c["overrides"].items()) or "(the stage's spec)"
                seeds.add_row(what, f"{c['n']}/{len(c['points'])}", _pm(c["mean"], c["std"]),
                              _pm(c["test_mean"], c["test_std"]))
            console.print(seeds)
        best = stage["best"]
        if best and stage["total"] == 1:
            console.print(f"model: {best['model']}", highlight=False, soft_wrap=True)
        elif best:
            line = f"best: {best['point']} ({shown} {number(best['value'])}"
            if best["test"] is not None:
                line += f", test {number(best['test'])}"
                if best["baseline"] is not None:
                    line += f" vs trivial baseline {number(best['baseline'])}"
            console.print(line + f"); model: {best['model']}", highlight=False, soft_wrap=True)
        elif stage["total"]:
            console.print("best: none yet (no point has finished)", highlight=False)
        console.print("")
