"""`mbl status` and `mbl list` answer how far, how fast, when done, what was saved, and whether a running job
still moves: a local job (a real supervisor process) with a run directory written as the trainer writes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.backends.base import JobRef, JobState, JobStatus
from launcher.cli import _row, cli
from launcher.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def train_row(step: int, t: float, total: int = 150) -> dict:
    return {"time": t, "step": step, "total_steps": total, "loss": 4.26699881, "lr": 1.78e-3, "grad_norm": 0.56,
            "tokens_per_s": 7758.5, "tokens": step * 4096}


@pytest.fixture
def running_job(tmp_path):
    """A local job whose supervisor runs (a sleep), registered as `mbl submit --detach` registers it."""
    run_dir = tmp_path / "run"
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    log, rc = logs / "local-2.log", logs / "local-2.rc"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.localrun", "--log", str(log), "--rc", str(rc), "--",
                             "sleep", "120"], cwd=REPO, start_new_session=True)
    ref = JobRef("local", f"local-{proc.pid}", "st-job", str(run_dir),
                 {"pid": proc.pid, "log": str(log), "rc": str(rc)})
    Registry().add(ref, team="nlp", kind="pretrain")
    deadline = time.monotonic() + 20
    while b"launcher.localrun" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield run_dir
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def write_run(run_dir: Path, last_row_age: float, checkpoint_age: float = 30.0, attempt: int = 2) -> float:
    """Rows every 5 s up to step 60 of 150 (10 steps per row), the newest `last_row_age` seconds ago."""
    now = time.time()
    last = now - last_row_age
    rows = [{"time": last - 60, "step": 0, "split": "heldout", "loss": 6.54, "perplexity": 693.3}]
    rows += [train_row(step, last - (60 - step) / 2) for step in range(10, 61, 10)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "latest").write_text("checkpoints/step-00000050\n")
    os.utime(run_dir / "latest", (now - checkpoint_age, now - checkpoint_age))
    (run_dir / "lease").mkdir(exist_ok=True)
    (run_dir / "lease" / "gen-00000004.json").write_text(
        json.dumps({"job": "j", "attempt": attempt, "acquired": last - 70, "heartbeat": now}))
    return now


def status(*args: str):
    result = CliRunner().invoke(cli, ["status", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_running_job_how_far_how_fast_when_done(running_job):
    now = write_run(running_job, last_row_age=3)
    row = json.loads(status("st-job", "-o", "json"))
    # the fields that were there before stay
    assert row["state"] == "RUNNING" and row["backend"] == "local" and row["team"] == "nlp"
    assert row["job_id"].startswith("local-") and row["run_dir"] == str(running_job) and "reason" in row
    assert (row["step"], row["total_steps"], row["percent"]) == (60, 150, 40.0)
    assert row["loss"] == pytest.approx(4.26699881) and row["tokens_per_s"] == pytest.approx(7758.5)
    assert row["eval"] == {"step": 0, "split": "heldout", "loss": 6.54, "perplexity": 693.3}
    # 0.5 s per step over the rows, 90 steps left, 3 s of them gone since the newest row
    assert row["eta_seconds"] == pytest.approx(42, abs=2)
    assert row["checkpoint_step"] == 50 and row["checkpoint_age_seconds"] == pytest.approx(30, abs=2)
    assert row["attempt"] == 2 and row["stalled"] is False
    assert row["last_update_seconds"] == pytest.approx(3, abs=2)
    assert time.time() - now < 10

    card = status("st-job")
    assert "60/150 (40%)" in card and "4.267" in card and "7,758 tokens/s" in card
    assert "step 50 (30s ago)" in card or "step 50 (31s ago)" in card
    assert "attempt 2" in card and "possibly stuck" not in card
    assert "heldout loss 6.540, perplexity 693.3 (step 0)" in card

    listing = CliRunner().invoke(cli, ["list"], catch_exceptions=False).output
    header = listing.splitlines()[0].split()
    assert header[:12] == ["NAME", "BACKEND", "JOB_ID", "STATE", "STEP", "%", "LOSS", "TOK/S", "ETA", "CKPT",
                           "STEP", "ATTEMPT"]
    line = next(x for x in listing.splitlines() if x.strip().startswith("st-job"))
    assert "RUNNING" in line and "60/150" in line and "40%" in line and "4.267" in line and "7,758" in line


def test_a_job_quiet_for_much_longer_than_usual_is_flagged(running_job):
    write_run(running_job, last_row_age=600)  # rows 5 s apart, then ten minutes of nothing
    row = json.loads(status("st-job", "-o", "json"))
    assert row["state"] == "RUNNING" and row["stalled"] is True and row["eta_seconds"] is None  # no ETA then
    assert "possibly stuck: no new metrics for 10m0" in status("st-job")
    table = status()  # every job
    assert "possibly stuck" in table


def test_a_finished_job_is_not_stuck_and_shows_its_summary(tmp_path):
    run_dir = tmp_path / "done"
    (run_dir / "logs").mkdir(parents=True)
    write_run(run_dir, last_row_age=3600)
    (run_dir / "lease" / "gen-00000004.json").unlink()  # released at the end
    (run_dir / "logs" / "local-0.rc").write_text("0\n")
    (run_dir / "summary.json").write_text(json.dumps({"kind": "pretrain", "final_dir": f"{run_dir}/final",
                                                      "heldout_loss": 2.39, "perplexity": 10.9, "steps": 150}))
    ref = JobRef("local", "local-1", "done-job", str(run_dir),
                 {"pid": 1, "log": str(run_dir / "logs/local-0.log"), "rc": str(run_dir / "logs/local-0.rc")})
    Registry().add(ref, kind="pretrain")
    row = json.loads(status("done-job", "-o", "json"))
    assert row["state"] == "COMPLETED" and row["stalled"] is False and row["eta_seconds"] is None
    card = status("done-job")
    assert "held-out MLM loss" in card and "2.390" in card and f"{run_dir}/final" in card


class Pending:
    def status(self, ref):
        return JobStatus(JobState.PENDING, "waiting for the team's GPU quota (AssocGrpGRES)")


def test_a_pending_job_says_why_in_words(tmp_path):
    ref = JobRef("slurm", "42", "queued", str(tmp_path / "nothing-yet"))
    record = Registry().add(ref, team="nlp", kind="pretrain", gpus=4)
    row, words = _row(record, Pending())
    assert row["state"] == "PENDING" and row["reason"] == "waiting for the team's GPU quota (AssocGrpGRES)"
    assert row["step"] is None and row["eta_seconds"] is None and row["stalled"] is False
    assert words["reason"] == row["reason"] and words["step"] == ""


def test_list_shows_a_run_directorys_progress_on_its_newest_job_only(tmp_path):
    """A run directory resubmitted (a cancel, then a resume) holds one progress: the newest job's."""
    run_dir = tmp_path / "shared"
    (run_dir / "logs").mkdir(parents=True)
    write_run(run_dir, last_row_age=5)
    for n in (0, 1):
        (run_dir / "logs" / f"local-{n}.rc").write_text("143\n" if n == 0 else "0\n")
        Registry().add(JobRef("local", f"local-{n}", "twice", str(run_dir),
                              {"pid": 1, "log": str(run_dir / f"logs/local-{n}.log"),
                               "rc": str(run_dir / f"logs/local-{n}.rc")}))
    rows = json.loads(CliRunner().invoke(cli, ["list", "-o", "json"], catch_exceptions=False).output)
    assert [(r["job_id"], r["step"]) for r in rows] == [("local-1", 60), ("local-0", None)]
