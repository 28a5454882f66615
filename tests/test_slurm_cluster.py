"""End to end on the real local Slurm cluster (slurm/dev/up.sh): submit, train across two nodes, preempt.

Every test submits examples/pretrain-tiny.yaml with `mbl submit --cluster slurm` as 2 nodes x 1 rank
(DeepSpeed on CPU, gloo) and the real trainer (jobs.train), then follows it with `mbl status/logs/list/
cancel`. Preemptions: `scontrol requeue`, `scancel --signal=USR1 --batch`, and a rank killed with SIGKILL;
each must checkpoint (or keep the last periodic checkpoint), requeue, resume and finish at the same step.
A requeued job pends about two minutes with reason BeginTime; the tests release it at once.

Skipped when no cluster answers; `.ci/run` starts one first (slurm/dev/up.sh).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
MBL = [sys.executable, "-m", "launcher.cli"]
DEV_CONF = Path(os.environ.get("MBL_SLURM_DIR", "/tmp/mbl-slurm")) / "slurm.conf"
STEPS, EVERY = 90, 30


def _slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("SLURM_CONF") and DEV_CONF.exists():
        env["SLURM_CONF"] = str(DEV_CONF)
    return env


def _cluster_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=_slurm_env(), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not _cluster_up():
        message = "no Slurm cluster answers (start one: slurm/dev/up.sh; source /tmp/mbl-slurm/env.sh)"
        if os.environ.get("MBL_REQUIRE_SLURM") == "1":  # scripts/test.sh, and so CI: never skip
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("slurm")
    profile = work / "profile.yaml"
    subprocess.run([sys.executable, str(ROOT / "slurm" / "make_dev_profile.py"), "-o", str(profile)], check=True)
    env = _slurm_env()
    env["MBL_HOME"] = str(work / "home")  # a registry of this module's own
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MBL_PROFILE", None)
    return {"work": work, "profile": profile, "env": env}


def mbl(cluster: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MBL, *args], env=cluster["env"], cwd=cluster["work"], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"mbl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def slurm(cluster: dict, *args: str) -> str:
    return subprocess.run(list(args), env=cluster["env"], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def submit(cluster: dict, tag: str, *sets: str) -> tuple[str, str, Path]:
    name = f"t-{tag}-{uuid.uuid4().hex[:6]}"
    run_dir = cluster["work"] / "runs" / name
    args = [
        "submit", "--cluster", "slurm", "--profile", str(cluster["profile"]), str(ROOT / "examples" / "pretrain-tiny.yaml"),
        "--set", f"name={name}", "--set", "team=nlp", "--set", f"checkpoint.dir={run_dir}",
        "--set", f"data.train=[{ROOT / 'examples' / 'data' / 'corpus.txt'}]",
        "--set", "distributed.nodes=2", "--set", "distributed.gpus_per_node=1",
        "--set", "resources.cpus_per_gpu=1", "--set", "resources.mem_per_node=1G",
        "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.every_steps={EVERY}",
        "--set", f"train.eval_every_steps={EVERY}", "--set", "train.warmup_steps=5",
        *(x for s in sets for x in ("--set", s)),
    ]
    mbl(cluster, *args)
    return name, status(cluster, name)["job_id"], run_dir


def status(cluster: dict, name: str) -> dict:
    return json.loads(mbl(cluster, "status", name, "-o", "json").stdout)


def state(cluster: dict, job_id: str) -> str:
    """The JobState of a job, asked in-process (polling `mbl` in a subprocess would steal the 2 CPUs)."""
    from launcher.backends.base import JobRef
    from launcher.backends.slurm import SlurmBackend

    ref = JobRef("slurm", job_id, "", "", {"slurm_conf": cluster["env"].get("SLURM_CONF", "")})
    return SlurmBackend().status(ref).state.value


def wait_for(what: str, predicate, timeout: float, cluster: dict | None = None, name: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    detail = ""
    if cluster and name:
        detail = "\n" + json.dumps(status(cluster, name)) + "\n" + mbl(cluster, "logs", name, check=False).stdout[-3000:]
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = [json.loads(x).get("step", -1) for x in lines if x.strip()]
    return max(steps, default=-1)


def release_requeued(cluster: dict, job_id: str, timeout: float = 90) -> None:
    """A requeued job pends ~2 min with reason BeginTime; start it at once."""
    def pending_on_begin_time() -> bool:
        out = slurm(cluster, "squeue", "--noheader", "--jobs", job_id, "-O", "State:|,Reason:|,RestartCnt:|")
        state, reason, restarts = (out.strip().split("|") + ["", "", ""])[:3]
        return state == "PENDING" and reason == "BeginTime" and restarts not in ("", "0")

    wait_for(f"job {job_id} to pend after its requeue", pending_on_begin_time, timeout)
    slurm(cluster, "scontrol", "update", f"jobid={job_id}", "starttime=now")


def wait_done(cluster: dict, name: str, timeout: float = 240) -> dict:
    job_id = status(cluster, name)["job_id"]
    wait_for(f"{name} to end", lambda: state(cluster, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout, cluster, name)
    return status(cluster, name)


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


def test_usr1_to_the_batch_shell_requeues(cluster: dict) -> None:
    name, job_id, run_dir = submit(cluster, "usr1")
    wait_for("a periodic checkpoint", lambda: last_step(run_dir) > EVERY + 5, 180, cluster, name)
    slurm(cluster, "scancel", "--signal=USR1", "--batch", job_id)
    release_requeued(cluster, job_id)
    first = (run_dir / "logs" / "attempt-0.log").read_text()
    assert "mbl: SIGUSR1" in first and "mbl: requeueing: restart 1" in first, first[-3000:]
    assert_resumed_and_finished(cluster, name, run_dir)
    # The trainer saved on the signal, past the last periodic checkpoint, and resumed from there.
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    resumed = int(second.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)
    assert resumed > EVERY, second[-2000:]


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
    assert "mbl: requeueing: restart 1" in first, first[-3000:]
    assert_resumed_and_finished(cluster, name, run_dir)


def test_cancel_and_status_of_a_pending_job(cluster: dict) -> None:
    # Held: pending with a reason mbl explains; then cancelled.
    name, job_id, run_dir = submit(cluster, "cancel", "slurm.sbatch_args.hold=")
    st = wait_for("the held job in squeue", lambda: (s := status(cluster, name))["state"] == "PENDING" and s, 30)
    assert "held by its user" in st["reason"], st
    out = mbl(cluster, "cancel", name).stdout
    assert f"cancelled {name}" in out
    st = wait_for("CANCELLED", lambda: (s := status(cluster, name))["state"] == "CANCELLED" and s, 60)
    assert "nothing to cancel" in mbl(cluster, "cancel", name).stdout
