"""A real tiny pre-train in the foreground, piped as in CI: plain lines with the training loss every
log_every_steps, no known-harmless warnings, no line twice, a readable summary table at the end; the log file
keeps everything; `mbl logs -v` shows it; `mbl plot` draws the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MBL = [sys.executable, "-m", "launcher.cli"]

pytestmark = pytest.mark.slow

HARMLESS = ["Setting accelerator to CPU", "all_gather_into_tensor", "deepspeed_shm_comm_op", "OMP_NUM_THREADS",
            "Writing model shards"]


def mbl(env, *args, timeout=600):
    return subprocess.run([*MBL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_foreground_submit_piped_prints_plain_quiet_lines(tmp_path, mbl_env):
    run_dir = tmp_path / "run"
    done = mbl(mbl_env, "submit", "examples/pretrain-tiny.yaml", "--set", "name=quiet-e2e",
               "--set", f"checkpoint.dir={run_dir}", "--set", "train.max_steps=20", "--set", "checkpoint.every_steps=10",
               "--set", "train.eval_every_steps=10")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    out = done.stdout
    assert "\x1b[" not in out and "━" not in out  # not a terminal: no escape codes, no bar
    assert "[mbl] step 10/20: loss " in out and "[mbl] step 20/20: loss " in out and " tokens/s" in out
    for noise in HARMLESS:
        assert noise not in out, noise
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
    # the end: a table, not JSON
    assert "[mbl]   held-out MLM loss" in out and "[mbl]   model " in out and f"{run_dir}/final" in out
    assert "summary: {" not in out
    assert "quiet-e2e: COMPLETED" in done.stderr

    log = next((run_dir / "logs").glob("local-*.log")).read_text()
    assert log.count("Setting accelerator to CPU") == 2  # one per rank, kept in the file
    verbose = mbl(mbl_env, "logs", "-v", "quiet-e2e").stdout
    assert verbose.count("Setting accelerator to CPU") == 2
    assert "Setting accelerator to CPU" not in mbl(mbl_env, "logs", "quiet-e2e").stdout

    png = tmp_path / "curves.png"
    plotted = mbl(mbl_env, "plot", "quiet-e2e", "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
