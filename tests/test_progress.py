"""Live progress and quiet logs: the trainer's step line, the run-directory tracker (rate, ETA, checkpoint,
attempt, stall), the log filter on a captured two-rank log, and the follower, plain and on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

from launcher.follow import Follower, LineFilter
from launcher.progress import STALL_FLOOR_SECONDS, Snapshot, Tracker, parse_step_line, snapshot, step_line
from launcher.summary import summary_rows, summary_text

REPO = Path(__file__).resolve().parents[1]

# The head of a real local log (examples/pretrain-tiny.yaml, two CPU ranks), as the job wrote it.
CAPTURED = """\
mbl launch: job vm-32402 attempt 0 on vm: torchrun --standalone --nnodes=1 --nproc-per-node=2 --max-restarts=0
W1128 17:52:39.497000 32408 .venv/lib/python3.11/site-packages/torch/distributed/run.py:874] \n\
W1128 17:52:39.497000 32408 .venv/lib/python3.11/site-packages/torch/distributed/run.py:874] *****************************************
W1128 17:52:39.497000 32408 .venv/lib/python3.11/site-packages/torch/distributed/run.py:874] Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed. \n\
W1128 17:52:39.497000 32408 .venv/lib/python3.11/site-packages/torch/distributed/run.py:874] *****************************************
[2026-11-28 17:52:48,730] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.
[2026-11-28 17:52:49,281] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.
DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully
DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully
[mbl] pretrain: 0.76M parameters, 2324 train / 47 held-out sequences, 2 ranks x micro 16 x accum 1, 150 steps
[mbl] step 0: held-out MLM loss 6.5414 (perplexity 693.27)
/x/.venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead.
  return func(*args, **kwargs)
/x/.venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead.
  return func(*args, **kwargs)
/x/site-packages/foo.py:12: UserWarning: something new that nobody has seen
  warnings.warn(
/x/site-packages/foo.py:12: UserWarning: something new that nobody has seen
  warnings.warn(
[mbl] step 10/150: loss 6.1498, lr 1.47e-03, grad norm 1.95, 7,095 tokens/s

Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]\rWriting model shards: 100%|##########| 1/1 [00:00<00:00, 118.22it/s]
[mbl] checkpoint step 50 saved in 0.1s
"""


def rows(*items):
    return "".join(json.dumps(r) + "\n" for r in items)


def train_row(step, t, total=150, loss=4.0, **extra):
    return {"time": t, "step": step, "total_steps": total, "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": 7000.0, "tokens": step * 4096, **extra}


# ---- the step line --------------------------------------------------------------------------------

def test_step_line_round_trip():
    row = train_row(20, 0.0, loss=4.7452, tokens_per_s=7561.2)
    line = step_line(row)
    assert line == "step 20/150: loss 4.7452, lr 1.00e-03, grad norm 0.5, 7,561 tokens/s"
    back = parse_step_line(f"0: [mbl] {line}\n")
    assert back == {"step": 20, "total_steps": 150, "loss": 4.7452, "lr": 1e-3, "tokens_per_s": 7561.0}
    # an evaluation line and a foreign line are not step lines
    assert parse_step_line("[mbl] step 50: held-out MLM loss 4.0941 (perplexity 59.99)") is None
    assert parse_step_line("step 3/4: loss 1.0 from some library") is None


# ---- the tracker ----------------------------------------------------------------------------------

def test_tracker_rate_eta_checkpoint_attempt(tmp_path):
    now = time.time()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(rows({"time": now - 60, "step": 0, "split": "heldout", "loss": 6.5},
                            train_row(10, now - 50), train_row(20, now - 40)))
    (tmp_path / "latest").write_text("checkpoints/step-00000020\n")
    os.utime(tmp_path / "latest", (now - 30, now - 30))
    (tmp_path / "lease").mkdir()
    (tmp_path / "lease" / "gen-00000003.json").write_text(json.dumps({"attempt": 2, "acquired": now - 70}))
    tracker = Tracker(tmp_path)
    s = tracker.poll()
    assert (s.step, s.total, s.loss, s.tokens_per_s) == (20, 150, 4.0, 7000.0)
    assert s.seconds_per_step == pytest.approx(1.0)
    assert s.percent == pytest.approx(100 * 20 / 150)
    assert s.evaluation["split"] == "heldout"
    assert (s.checkpoint_step, s.attempt) == (20, 2)
    assert s.eta(now) == pytest.approx(130 - 40, abs=1)  # 130 steps at 1 s, minus the 40 s since the row
    words = s.words(now)
    assert words["step"] == "20/150" and words["percent"] == "13%" and words["eta"] == "1m30s"
    assert words["checkpoint"] == "20 (30s ago)" and words["loss"] == "4.000"

    # appended rows, one of them half written: read from where it stopped, the half line on the next poll
    line = json.dumps(train_row(30, now - 35)) + "\n"
    with open(metrics, "a") as fh:
        fh.write(line[:25])
    assert tracker.poll().step == 20
    with open(metrics, "a") as fh:
        fh.write(line[25:])
    assert tracker.poll().step == 30
    assert tracker.state.seconds_per_step == pytest.approx(15 / 20)

    # a resume from an earlier checkpoint starts a new stretch for the rate
    with open(metrics, "a") as fh:
        fh.write(rows(train_row(25, now - 10), train_row(30, now - 5)))
    s = tracker.poll()
    assert s.step == 30 and s.seconds_per_step == pytest.approx(1.0)


def test_total_steps_from_the_spec_before_the_first_row(tmp_path):
    (tmp_path / "spec.yaml").write_text("kind: pretrain\ntrain: {max_steps: 400}\n")
    assert snapshot(tmp_path).total == 400
    (tmp_path / "spec.yaml").write_text("kind: finetune\ntrain: {max_steps: 400, epochs: 2}\n")
    assert snapshot(tmp_path).total is None  # epochs: the trainer knows the total; its rows will say


def test_snapshot_reads_only_the_tail_of_a_long_file(tmp_path):
    now = time.time()
    many = [train_row(i, now - 5000 + i) for i in range(1, 5001)]
    (tmp_path / "metrics.jsonl").write_text(rows(*many))
    s = snapshot(tmp_path, tail_bytes=4096)
    assert s.step == 5000 and s.seconds_per_step == pytest.approx(1.0)


def test_stall_needs_much_longer_than_the_usual_gap():
    s = Snapshot(step=40, total=150, seconds_per_step=0.5, last_time=1000.0, gaps=[5.0, 5.2, 4.9, 5.1])
    assert s.stall_threshold() == STALL_FLOOR_SECONDS  # 10 x 5 s is below the floor
    assert not s.stalled(1000.0 + STALL_FLOOR_SECONDS - 1)
    assert s.stalled(1000.0 + STALL_FLOOR_SECONDS + 1)
    # a long evaluation seen before raises the bar: twice the longest gap
    s.gaps.append(400.0)
    assert s.stall_threshold() == 800.0 and not s.stalled(1000.0 + 700)
    # a new attempt that just took the lease is starting, not stuck
    s.gaps = [5.0, 5.0]
    s.started = 1000.0 + 500
    assert not s.stalled(1000.0 + 550)
    # too few rows to know what is usual
    assert not Snapshot(last_time=0.0, gaps=[1.0]).stalled(10 ** 6)
    fields = Snapshot(step=1, last_time=0.0, gaps=[1.0, 1.0]).fields(now=10 ** 6)
    assert fields["stalled"] is True and fields["last_update_seconds"] == 10 ** 6


# ---- quiet logs -----------------------------------------------------------------------------------

def test_filter_hides_harmless_noise_and_per_rank_repeats():
    f = LineFilter()
    shown = [x for x in (f(line) for line in CAPTURED.splitlines(keepends=True)) if x is not None]
    assert shown == [
        "mbl launch: job vm-32402 attempt 0 on vm: torchrun --standalone --nnodes=1 --nproc-per-node=2 --max-restarts=0",
        "[mbl] pretrain: 0.76M parameters, 2324 train / 47 held-out sequences, 2 ranks x micro 16 x accum 1, 150 steps",
        "[mbl] step 0: held-out MLM loss 6.5414 (perplexity 693.27)",
        "/x/site-packages/foo.py:12: UserWarning: something new that nobody has seen",  # unknown: shown, once
        "  warnings.warn(",
        "[mbl] step 10/150: loss 6.1498, lr 1.47e-03, grad norm 1.95, 7,095 tokens/s",
        "[mbl] checkpoint step 50 saved in 0.1s",
    ]
    verbose = LineFilter(verbose=True)
    assert [verbose(x) for x in CAPTURED.splitlines()] == CAPTURED.splitlines()


def test_filter_folds_the_nodes_of_a_slurm_log():
    f = LineFilter()
    lines = ["0: [2026-11-28 17:52:48,730] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
             "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
             "0: Some library notice", "1: Some library notice",
             "0: mbl launch: job 7 attempt 0 on node1", "1: mbl launch: job 7 attempt 0 on node2",
             "0: [mbl] step 10/90: loss 6.0"]
    assert [x for x in map(f, lines) if x] == ["0: Some library notice", "0: mbl launch: job 7 attempt 0 on node1",
                                               "1: mbl launch: job 7 attempt 0 on node2", "0: [mbl] step 10/90: loss 6.0"]
    # the next attempt prints its own lines again, once
    again = ["==> attempt-1.log <==", "0: Some library notice", "1: Some library notice"]
    assert [x for x in map(f, again) if x] == ["==> attempt-1.log <==", "0: Some library notice"]


# ---- the follower ---------------------------------------------------------------------------------

def test_follower_prints_plain_lines_when_piped(tmp_path, capsys):
    out = StringIO()
    with Follower("job", tmp_path, stream=out) as follow:
        for line in CAPTURED.splitlines(keepends=True):
            follow.line(line)
    assert "mbl: 17 known-harmless or repeated log line(s) not shown; --verbose shows them" in capsys.readouterr().err
    text = out.getvalue()
    assert "\x1b[" not in text and "━" not in text  # no escape codes, no bar
    assert text.count("[mbl] step 10/150: loss 6.1498") == 1
    assert "Setting accelerator to CPU" not in text and "all_gather_into_tensor" not in text


def test_follower_without_metrics_reads_the_step_lines(tmp_path):
    follow = Follower("job", tmp_path / "not-mounted-here", stream=StringIO())
    follow.line("0: [mbl] step 30/150: loss 4.2670, lr 1.78e-03, grad norm 0.563, 7,759 tokens/s\n")
    s = follow.tracker.poll()
    assert (s.step, s.total, s.loss, s.tokens_per_s) == (30, 150, 4.267, 7759.0)


SHOW = """
import sys, time
from launcher.follow import Follower
with Follower("tiny-pretrain", sys.argv[1], poll_seconds=0.2) as follow:
    for line in sys.stdin:
        follow.line(line)
    time.sleep(0.6)
"""


def test_follower_draws_the_bar_on_a_terminal(tmp_path):
    """On a (pseudo-)terminal: a Rich bar under the log lines with step/total, percent, loss, lr, tokens/s,
    ETA and the checkpoint; the harmless warnings are gone."""
    now = time.time()
    (tmp_path / "metrics.jsonl").write_text(rows(train_row(10, now - 20), train_row(20, now - 10),
                                                 train_row(30, now - 1, loss=4.267, tokens_per_s=7759.0)))
    (tmp_path / "latest").write_text("checkpoints/step-00000020\n")
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "110", "LINES": "30", "TERM": "xterm-256color",
           "PYTHONPATH": str(REPO)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-c", SHOW, str(tmp_path)], stdin=subprocess.PIPE, stdout=slave,
                            stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    proc.stdin.write(CAPTURED.encode())
    proc.stdin.close()
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    raw = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, raw
    assert "\x1b[" in raw  # drawn, not printed plain
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    last = screen[screen.rindex("tiny-pretrain"):]  # the bar as last drawn
    assert "━" in last and "30/150" in last and "20%" in last and "ETA" in last, last
    assert "loss 4.267" in last and "lr 1.00e-03" in last and "tok/s 7,759" in last, last
    assert "ckpt step 20" in last, last
    assert "[mbl] step 10/150: loss 6.1498" in screen
    assert "Setting accelerator to CPU" not in screen and "deepspeed_shm_comm_op" not in screen


# ---- the end of a run -----------------------------------------------------------------------------

def test_summary_rows_pretrain_and_finetune():
    pre = {"kind": "pretrain", "final_dir": "/r/final", "steps": 150, "tokens": 614400, "heldout_loss_start": 6.54,
           "heldout_loss": 2.3942, "perplexity": 10.96, "run_dir": "/r", "wall_seconds": 94.2, "tokens_per_s": 7328.1}
    assert dict(summary_rows(pre)) == {
        "held-out MLM loss": "2.394   (at the start 6.540)", "held-out perplexity": "10.96", "model": "/r/final",
        "steps": "150   (614,400 tokens)", "wall time": "1m34s   (this attempt)", "speed": "7,328 tokens/s"}
    fine = {"kind": "finetune", "task": "classification", "final_dir": "/f/final", "steps": 100, "best_step": 50,
            "best_validation_accuracy": 0.995, "test": {"accuracy": 0.99, "f1": 0.98},
            "test_baseline": {"accuracy": 0.535, "f1": 0.3485}, "pretrain": {"heldout_loss": 2.39, "perplexity": 10.9},
            "wall_seconds": 25.1}
    table = dict(summary_rows(fine))
    assert table["validation accuracy (best)"] == "0.9950   (step 50)"
    assert table["test accuracy"] == "0.9900   (trivial baseline 0.5350)"
    assert table["test f1"] == "0.9800   (trivial baseline 0.3485)"
    assert table["pre-training held-out loss"] == "2.390   (perplexity 10.90)"
    text = summary_text(fine)
    width = max(len(label) for label in table)
    assert [line[2 + width + 2:] for line in text] == list(table.values())  # one column of values
    assert not any("{" in line for line in text)  # no JSON
