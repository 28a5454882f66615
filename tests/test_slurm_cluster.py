"""End to end on the real local Slurm cluster (slurm/dev/up.sh): submit, train across two nodes, preempt.

Every test submits examples/pretrain-tiny.yaml with `mbl submit --cluster slurm` as 2 nodes x 1 rank
(DeepSpeed on CPU, gloo) and the real trainer (jobs.launch -> torchrun -> jobs.train), then follows it with
`mbl status/logs/list/cancel`. Preemptions: `scontrol requeue`, `scancel --signal=USR1 --batch` (with a
60 s save), and a rank killed with SIGKILL; each must checkpoint (or keep the last periodic checkpoint),
requeue, resume and finish at the same step. Bad input fails after one attempt.
A requeued job pends about two minutes with reason BeginTime; the tests release it at once.

Skipped when no cluster answers, except under scripts/test.sh (and so CI), which starts one and fails instead.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from slurm_util import EVERY, STEPS, last_step, mbl, release_requeued, slurm, state, status, submit, wait_done, wait_for

pytestmark = pytest.mark.slurm


def assert_resumed_and_finished(cluster: dict, name: str, run_dir: Path) -> None:
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (run_dir / "final").is_dir() and (run_dir / "DONE").exists()
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "resumed from checkpoints/step-" in second, second[-3000:]
    assert "DONE: the job is complete" in second


def test_two_node_pretrain_completes(cluster: dict) -> None:
    t0 = time.monotonic()
    name, job_id, run_dir = submit(cluster, "ok")
    wait_for("the job to run", lambda: state(cluster, job_id) == "RUNNING", 60, cluster, name)
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final
    log = (run_dir / "logs" / "attempt-0.log").read_text()
    assert "on node[1-2]" in log
    # srun --label: lines from both nodes' torchrun; the trainer saw 2 ranks.
    assert "\n0: " in log and "\n1: " in log
    assert "2 ranks x micro 16" in log
    assert "DONE: the job is complete" in log
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert (run_dir / "final").is_dir()
    assert (run_dir / "job.sbatch").exists() and (run_dir / "spec.yaml").exists()
    assert (run_dir / "logs" / f"job-{job_id}.sbatch").exists()
    # mbl logs prints the current attempt; mbl list shows the job with its state.
    assert "DONE: the job is complete" in mbl(cluster, "logs", name).stdout
    rows = json.loads(mbl(cluster, "list", "-o", "json").stdout)
    assert any(r["name"] == name and r["job_id"] == job_id and r["state"] == "COMPLETED" for r in rows)
    print(f"two-node pretrain: {time.monotonic() - t0:.0f}s from submit to COMPLETED")


def test_scontrol_requeue_checkpoints_and_resumes(cluster: dict) -> None:
    name, job_id, run_dir = submit(cluster, "rq")
    wait_for("a periodic checkpoint", lambda: last_step(run_dir) > EVERY + 5, 180, cluster, name)
    slurm(cluster, "scontrol", "requeue", job_id)
    release_requeued(cluster, job_id)
    assert_resumed_and_finished(cluster, name, run_dir)
    # Slurm sent SIGTERM; the ranks saved past the last periodic checkpoint (the batch shell itself may be
    # killed after KillWait before it logs its last line), and the next attempt resumed from that save.
    assert "mbl: SIGTERM" in (run_dir / "logs" / "attempt-0.log").read_text()
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    resumed = int(second.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)
    assert resumed > EVERY, second[-2000:]


def test_usr1_with_a_60s_save_requeues_and_resumes(cluster: dict) -> None:
    """The time-limit warning path: USR1 to the batch shell -> SIGTERM to the steps -> jobs.launch forwards it;
    rank 0 takes 60 s to save (MBL_FAULT_SAVE_DELAY) and is not killed (torchrun waits save_grace_seconds,
    not its default 30 s); the script requeues on jobs.launch's requeue code; the next attempt resumes."""
    name, job_id, run_dir = submit(cluster, "usr1", f"checkpoint.every_steps={STEPS}", "env.MBL_FAULT_SAVE_DELAY=60")
    wait_for("training steps", lambda: last_step(run_dir) >= 10, 180, cluster, name)
    slurm(cluster, "scancel", "--signal=USR1", "--batch", job_id)
    release_requeued(cluster, job_id, timeout=180)
    first = (run_dir / "logs" / "attempt-0.log").read_text()
    assert "mbl: SIGUSR1" in first and "mbl: requeueing (restart 1)" in first, first[-3000:]
    assert "sleeps 60s inside the save" in first and "goes on with the save" in first, first[-3000:]
    assert "requeue (exit 143): SIGTERM" in first, first[-3000:]
    assert_resumed_and_finished(cluster, name, run_dir)
    # The trainer saved on the signal (there is no periodic checkpoint before the end) and resumed there.
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    resumed = int(second.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)
    assert resumed >= 10, second[-2000:]


def test_missing_data_fails_after_one_attempt(cluster: dict) -> None:
    """Bad input is failed for good: no requeue, and `mbl status` says why."""
    name, job_id, run_dir = submit(cluster, "bad", f"data.train=[{cluster['work']}/no-such-corpus.txt]")
    final = wait_done(cluster, name)
    assert final["state"] == "FAILED", final
    assert "bad input" in final["reason"], final
    assert not (run_dir / "logs" / "attempt-1.log").exists()
    log = (run_dir / "logs" / "attempt-0.log").read_text()
    assert "no-such-corpus.txt" in log and "mbl: failed for good" in log, log[-3000:]
    assert " Restarts=0 " in slurm(cluster, "scontrol", "show", "job", "-o", job_id)


def _rank_pids(run_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [c.decode(errors="replace") for c in cmd]
        if "jobs.train" in text and str(run_dir / "spec.yaml") in text and not any("torchrun" in c for c in text):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_requeues_and_resumes(cluster: dict) -> None:
    name, job_id, run_dir = submit(cluster, "kill")
    wait_for("a periodic checkpoint", lambda: last_step(run_dir) > EVERY + 5, 180, cluster, name)
    pids = _rank_pids(run_dir)
    assert pids, "no trainer rank found"
    os.kill(pids[-1], signal.SIGKILL)
    release_requeued(cluster, job_id)
    first = (run_dir / "logs" / "attempt-0.log").read_text()
    # a crash after progress, with slurm.max_restarts left: jobs.launch says requeue
    assert "requeue (exit 143): failed (rank" in first and "killed by SIGKILL" in first, first[-3000:]
    assert "mbl: requeueing (restart 1)" in first, first[-3000:]
    assert_resumed_and_finished(cluster, name, run_dir)


def test_cancel_and_status_of_a_pending_job(cluster: dict) -> None:
    # Held: pending with a reason mbl explains; then cancelled.
    name, job_id, run_dir = submit(cluster, "cancel", "slurm.sbatch_args.hold=")
    st = wait_for("the held job in squeue", lambda: (s := status(cluster, name))["state"] == "PENDING" and s, 30)
    assert "held by its user" in st["reason"], st
    # one writer per run directory: the same spec again is refused while this job pends
    with pytest.raises(AssertionError) as refused:
        submit(cluster, "cancel", "slurm.sbatch_args.hold=", name=name)
    assert "exited 2" in str(refused.value) and f"still PENDING: {name}" in str(refused.value)
    assert f"mbl cancel {name}" in str(refused.value)
    out = mbl(cluster, "cancel", name).stdout
    assert f"cancelled {name}" in out
    st = wait_for("CANCELLED", lambda: (s := status(cluster, name))["state"] == "CANCELLED" and s, 60)
    assert "nothing to cancel" in mbl(cluster, "cancel", name).stdout


def test_a_hung_rank_is_requeued_with_its_stacks_and_resumes(cluster: dict) -> None:
    """Rank 1 (the second node) sleeps at step 40 of attempt 0: within the 15 s hang limit both ranks log their
    stacks and exit 76; jobs.launch says requeue, the script requeues, and attempt 1 resumes from step 30."""
    name, job_id, run_dir = submit(cluster, "hang", "env.MBL_FAULT_HANG=1@40@0",
                                   "distributed.hang_timeout_seconds=15",
                                   "distributed.collective_timeout_seconds=300")
    release_requeued(cluster, job_id, timeout=240)
    first = (run_dir / "logs" / "attempt-0.log").read_text()
    assert "MBL_FAULT_HANG: rank 1 sleeps at step 40" in first, first[-3000:]
    assert "[mbl] hang: rank 1" in first and "in fault_hang" in first, first[-3000:]
    assert "[mbl] hang: rank 0" in first  # rank 0 waited for it in a collective: its stack says where
    assert "requeue (exit 143): no progress on rank(s)" in first, first[-3000:]
    assert_resumed_and_finished(cluster, name, run_dir)


def test_a_node_failing_the_preflight_is_named_and_excluded_from_the_requeue(cluster: dict) -> None:
    """A one-node job with the preflight on; attempt 0's node fails its shared-storage check (fault point): the
    log names the node and the check, the script requeues excluding it, and attempt 1 runs on the other node."""
    name, job_id, run_dir = submit(cluster, "preflight", "distributed.nodes=1", "distributed.gpus_per_node=2",
                                   "resources.mem_per_node=3G", "distributed.preflight=true",
                                   "distributed.preflight_allreduce_mb=8",
                                   "env.MBL_FAULT_PREFLIGHT=*:shared storage@0")
    release_requeued(cluster, job_id, timeout=240)
    first = (run_dir / "logs" / "attempt-0.log").read_text()
    bad = (run_dir / "logs" / f"bad-nodes-{job_id}").read_text().split()
    assert len(bad) == 1 and bad[0] in ("node1", "node2"), bad
    assert f"preflight FAILED on {bad[0]}: shared storage" in first, first[-3000:]
    assert f"the next attempt excludes {bad[0]}" in first, first[-3000:]
    assert f"ExcNodeList={bad[0]}" in slurm(cluster, "scontrol", "show", "job", job_id)
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "preflight: 2 ranks on 1 host(s) passed" in second and "bus bandwidth" in second, second[-3000:]
    nodes = slurm(cluster, "sacct", "-n", "-X", "-j", job_id, "-o", "NodeList%30").split()
    assert bad[0] not in nodes[-1:], nodes
