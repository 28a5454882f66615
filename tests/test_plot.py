"""`mbl plot`: a valid PNG of two runs' curves, rows of a resumed attempt replacing the earlier ones, clean errors,
and matplotlib kept out of the launcher's start."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from launcher.backends.base import JobRef
from launcher.cli import cli
from launcher.plot import load_runs
from launcher.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def make_run(path: Path, name: str, kind: str, steps: int) -> Path:
    path.mkdir(parents=True)
    (path / "spec.yaml").write_text(f"kind: {kind}\nname: {name}\n")
    rows = []
    for step in range(10, steps + 1, 10):
        rows.append({"time": step, "step": step, "total_steps": steps, "loss": 6.0 / (1 + step / 20),
                     "lr": 1e-3 * (1 - step / steps), "tokens_per_s": 7000 + step, "tokens": step * 4096})
        if step % 50 == 0:
            split = "heldout" if kind == "pretrain" else "validation"
            rows.append({"time": step, "step": step, "split": split, "loss": 5.0 / (1 + step / 20),
                         "perplexity": 100.0, "accuracy": step / steps})
    if kind == "finetune":
        rows.append({"time": steps, "step": steps, "split": "test", "accuracy": 0.9, "f1": 0.88})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return width, height


def test_plot_two_runs_writes_a_valid_png(tmp_path):
    pre = make_run(tmp_path / "runs" / "pre", "tiny-pretrain", "pretrain", 150)
    fine = make_run(tmp_path / "runs" / "fine", "tiny-finetune", "finetune", 100)
    Registry().add(JobRef("local", "local-1", "tiny-finetune", str(fine), {}), kind="finetune")
    out = tmp_path / "out" / "curves.png"
    result = CliRunner().invoke(cli, ["plot", str(pre), "tiny-finetune", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    assert png_size(out) == (1320, 880)  # 12 x 8 inches at 110 dpi
    assert out.stat().st_size > 30_000  # four panels of curves, not an empty canvas


def test_a_resumed_attempt_replaces_the_rows_it_wrote_again(tmp_path):
    run = make_run(tmp_path / "r", "r", "pretrain", 40)
    with open(run / "metrics.jsonl", "a") as fh:  # resumed from step 20: steps 30 and 40 again
        for step in (30, 40):
            fh.write(json.dumps({"time": 100 + step, "step": step, "loss": 0.5, "lr": 0.0}) + "\n")
    [(label, rows)] = load_runs([("r", run)])
    assert [rows[("train", s)]["loss"] for s in (10, 20, 30, 40)] == [4.0, 3.0, 0.5, 0.5]


def test_plot_errors_say_what_to_give(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["plot", str(empty)])
    assert result.exit_code == 2 and "no metrics to plot" in result.output
    result = CliRunner().invoke(cli, ["plot", "no-such-job"])
    assert result.exit_code == 2 and "neither a run directory nor a submitted job" in result.output


def test_the_launcher_starts_without_matplotlib_or_torch():
    code = ("import sys, launcher.cli, launcher.follow, launcher.progress, launcher.summary, launcher.plot; "
            "heavy = [m for m in ('matplotlib', 'torch', 'transformers', 'deepspeed') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
