"""The local backend end to end, as a user runs it: submit --detach, status, logs, cancel (the job saves),
submit again (it resumes), a finished job started again, and a different spec refused in its run dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MBL = [sys.executable, "-m", "launcher.cli"]

pytestmark = pytest.mark.slow


def mbl(env, *args, timeout=600):
    return subprocess.run([*MBL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    return max((json.loads(x).get("step", -1) for x in lines if x.strip()), default=-1)


def test_detach_cancel_resume_complete(tmp_path, mbl_env):
    run_dir = tmp_path / "run"
    sets = ["--set", "name=local-e2e", "--set", f"checkpoint.dir={run_dir}", "--set", "train.max_steps=120",
            "--set", "checkpoint.every_steps=100", "--set", "train.eval_every_steps=60"]
    spec = "examples/pretrain-tiny.yaml"
    # the first attempt's save on cancel takes 60 s (rank 0 sleeps in it): torchrun must not kill it
    started = mbl({**mbl_env, "MBL_FAULT_SAVE_DELAY": "60"}, "submit", "--detach", spec, *sets)
    assert started.returncode == 0, started.stderr
    assert "submitted pretrain 'local-e2e' to local" in started.stderr

    deadline = time.monotonic() + 240
    while last_step(run_dir) < 20:
        assert time.monotonic() < deadline, mbl(mbl_env, "logs", "local-e2e").stdout[-3000:]
        time.sleep(1)
    row = json.loads(mbl(mbl_env, "status", "local-e2e", "-o", "json").stdout)
    assert row["state"] == "RUNNING" and row["backend"] == "local"
    assert "step" in mbl(mbl_env, "logs", "local-e2e").stdout
    # one writer per run directory: the same spec again is refused while the job runs
    twice = mbl(mbl_env, "submit", "--detach", spec, *sets)
    assert twice.returncode == 2, twice.stderr
    assert "still RUNNING: local-e2e" in twice.stderr and "mbl cancel local-e2e" in twice.stderr

    cancelled = mbl(mbl_env, "cancel", "local-e2e")
    assert cancelled.returncode == 0 and "cancelled local-e2e" in cancelled.stdout
    deadline = time.monotonic() + 180
    while json.loads(mbl(mbl_env, "status", "local-e2e", "-o", "json").stdout)["state"] == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert json.loads(mbl(mbl_env, "status", "local-e2e", "-o", "json").stdout)["state"] == "CANCELLED"
    log = mbl(mbl_env, "logs", "local-e2e").stdout
    assert "sleeps 60s inside the save" in log and "goes on with the save" in log, log[-3000:]
    assert "requeue (exit 143): SIGTERM" in log, log[-3000:]
    # SIGTERM made every rank save at the step it had reached, before the periodic checkpoint at 100
    latest = (run_dir / "latest").read_text().strip()
    saved = int(latest.rsplit("-", 1)[1])
    assert 20 <= saved < 100, latest
    assert not (run_dir / "DONE").exists()

    # the same spec again resumes from that checkpoint and completes, in the foreground
    resumed = mbl(mbl_env, "submit", spec, *sets)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert f"resumed from checkpoints/step-{saved:08d}" in resumed.stdout
    assert "local-e2e: COMPLETED" in resumed.stderr
    assert (run_dir / "DONE").exists() and (run_dir / "final" / "config.json").exists()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert max(steps) == 120

    rows = json.loads(mbl(mbl_env, "list", "-o", "json").stdout)
    assert [r["state"] for r in rows if r["name"] == "local-e2e"] == ["COMPLETED", "CANCELLED"]

    # a finished job started again exits 0 at once; a different spec is refused and nothing is touched
    again = mbl(mbl_env, "submit", spec, *sets, timeout=120)
    assert again.returncode == 0, again.stderr
    before = (run_dir / "spec.yaml").read_text()
    other = mbl(mbl_env, "submit", spec, *sets, "--set", "train.lr=0.01")
    assert other.returncode == 2 and "already holds a different job" in other.stderr and "train.lr" in other.stderr
    assert (run_dir / "spec.yaml").read_text() == before


def _launch_pid(supervisor: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == supervisor and b"jobs.launch" in cmd:
            return int(stat.parent.name)
    raise AssertionError(f"no jobs.launch below {supervisor}")


def test_signal_preempts_and_bad_input_fails(tmp_path, mbl_env):
    """The outcomes on the local backend: a signal to the node's launcher -> PREEMPTED (saved, resumable);
    bad input -> FAILED with the reason, exit 1."""
    run_dir = tmp_path / "sig"
    sets = ["--set", "name=local-sig", "--set", f"checkpoint.dir={run_dir}", "--set", "train.max_steps=400",
            "--set", "checkpoint.every_steps=400", "--set", "train.eval_every_steps=400"]
    started = mbl(mbl_env, "submit", "--detach", "examples/pretrain-tiny.yaml", *sets)
    assert started.returncode == 0, started.stderr
    row = json.loads(mbl(mbl_env, "status", "local-sig", "-o", "json").stdout)
    supervisor = int(row["job_id"].split("-")[1])
    deadline = time.monotonic() + 240
    while last_step(run_dir) < 10:
        assert time.monotonic() < deadline, mbl(mbl_env, "logs", "local-sig").stdout[-3000:]
        time.sleep(1)
    os.kill(_launch_pid(supervisor), signal.SIGUSR1)  # Slurm's time-limit warning, as a node's launcher sees it
    deadline = time.monotonic() + 120
    while (row := json.loads(mbl(mbl_env, "status", "local-sig", "-o", "json").stdout))["state"] == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert row["state"] == "PREEMPTED", row
    assert "requeue: SIGUSR1" in row["reason"], row
    assert (run_dir / "latest").exists() and not (run_dir / "DONE").exists()

    bad = mbl(mbl_env, "submit", "examples/pretrain-tiny.yaml", "--set", "name=local-bad",
              "--set", f"checkpoint.dir={tmp_path / 'bad'}", "--set", f"data.train=[{tmp_path}/missing.txt]")
    assert bad.returncode == 1, bad.stderr
    row = json.loads(mbl(mbl_env, "status", "local-bad", "-o", "json").stdout)
    assert row["state"] == "FAILED" and "bad input" in row["reason"], row
    assert "missing.txt" in bad.stdout
