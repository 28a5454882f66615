"""Cluster faults on the real local Slurm cluster (slurm/dev/up.sh), each showing that no checkpoint is lost.

- a `slurmd` killed (SIGKILL) during a two-node job: Slurm fails the node and requeues the job (NODE_FAIL), and
  the next attempt resumes from the newest complete checkpoint;
- `slurmctld` stopped and started again during a job: `mbl status` answers meanwhile (from accounting, with a
  warning), and the job completes in its first attempt;
- `slurmdbd` down: `mbl status` and `mbl list` answer from squeue and the run directories with a warning, the
  quota pre-check, `mbl quota show` and `mbl quota report` say that they are incomplete;
- the shared storage full during a checkpoint (a real tmpfs run directory, shrunk while the save runs): the job
  fails with the error and its fix, and `latest` still names a complete checkpoint.

Every test restores what it broke in a fixture (`slurm/dev/up.sh` starts what is missing and waits for both
nodes), also when it fails. The jobs are examples/pretrain-tiny.yaml on 2 nodes x 1 rank (as in
test_slurm_cluster.py), 30 steps of 16 sequences, a checkpoint every 10 (on this machine one rank alone trains
several times slower than two). Killing daemons and mounting a tmpfs need root, as the dev cluster does.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_util import MBL, ROOT, last_step, mbl, release_requeued, slurm, state, status, submit, wait_done, wait_for

from launcher.backends.base import JobRef
from launcher.registry import Registry

pytestmark = pytest.mark.slurm

SLURM_DIR = Path(os.environ.get("MBL_SLURM_DIR", "/tmp/mbl-slurm"))
DAEMONS = {  # name -> (pid file, /proc/PID/comm), as slurm/dev/common.sh names them
    "slurmctld": ("slurmctld.pid", "slurmctld"),
    "slurmdbd": ("slurmdbd.pid", "slurmdbd"),
    "slurmd-node1": ("slurmd-node1.pid", "slurmd"),
    "slurmd-node2": ("slurmd-node2.pid", "slurmd"),
}
STEPS = 30
SHORT = (f"train.max_steps={STEPS}", "checkpoint.every_steps=10", f"train.eval_every_steps={STEPS}",
         "train.log_every_steps=5", "train.global_batch_size=16", "train.micro_batch_size=8")


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        message = "stopping the dev cluster's daemons and mounting a tmpfs need root"
        if os.environ.get("MBL_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def daemon_pid(name: str) -> int | None:
    pidfile, comm = DAEMONS[name]
    try:
        pid = int((SLURM_DIR / "run" / pidfile).read_text().strip())
        alive = Path(f"/proc/{pid}/comm").read_text().strip() == comm
        # a zombie is dead: this machine's init may reap late
        alive = alive and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive else None


def stop_daemon(name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    pid = daemon_pid(name)
    assert pid is not None, f"{name} is not running"
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while daemon_pid(name) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon_pid(name) is None, f"{name} (pid {pid}) did not stop in {timeout:.0f}s"


def restore_cluster(cluster: dict) -> None:
    """slurm/dev/up.sh: starts whichever daemon is missing, resumes a node left down, waits for both nodes."""
    env = {**cluster["env"], "MBL_SLURM_SMOKE": "0"}
    proc = subprocess.run([str(ROOT / "slurm" / "dev" / "up.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"slurm/dev/up.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    missing = [name for name in DAEMONS if daemon_pid(name) is None]
    assert not missing, f"still down after slurm/dev/up.sh: {missing}"


@pytest.fixture
def restore(cluster: dict):
    """Whatever a test stops, the cluster is whole again after it (pass or fail), for the tests that follow."""
    yield lambda: restore_cluster(cluster)
    try:
        states = set(slurm(cluster, "sinfo", "-h", "-N", "-o", "%T").split())
    except subprocess.SubprocessError:
        states = {"no answer"}
    if any(daemon_pid(name) is None for name in DAEMONS) or states - {"idle", "mixed", "allocated", "completing"}:
        restore_cluster(cluster)


# ---- checkpoints, read without the trainer's code ------------------------------------------------------------


def verify(folder: Path) -> str | None:
    """None when the checkpoint is complete: COMPLETE present, every file of manifest.json there with its size
    and sha256."""
    if not (folder / "COMPLETE").exists():
        return "no COMPLETE marker"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return f"{rel}: missing or of another size"
        if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


def complete_checkpoints(run_dir: Path) -> dict[int, str | None]:
    """step -> verify() of every step-N folder (a save in progress is a .tmp-* folder and not listed)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return {}
    return {int(p.name.split("-")[1]): verify(p) for p in sorted(folder.glob("step-*"))}


def latest_step(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "latest").read_text().strip().rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def assert_no_checkpoint_lost(run_dir: Path, before: dict[int, str | None], keep_last: int = 2) -> None:
    """Every checkpoint there is complete and intact, `latest` names the newest, and each one complete before
    the fault is still there, unless retention replaced it: it keeps the keep_last newest (examples/
    pretrain-tiny.yaml: 2), so an older one may go once that many newer ones are complete."""
    now = complete_checkpoints(run_dir)
    assert now and all(problem is None for problem in now.values()), now
    assert latest_step(run_dir) == max(now), (latest_step(run_dir), now)
    for step, problem in before.items():
        assert problem is None, f"checkpoint {step} was already broken before the fault: {problem}"
        newer = [s for s in now if s > step]
        assert now.get(step, "gone") is None or len(newer) >= keep_last, \
            f"checkpoint step {step} lost or broken ({now.get(step, 'gone')}); complete now: {now}"


def resumed_step(log: str) -> int:
    assert "resumed from checkpoints/step-" in log, log[-3000:]
    return int(log.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)


# ---- the faults ---------------------------------------------------------------------------------------------


def test_killed_slurmd_requeues_and_resumes_from_the_newest_checkpoint(cluster: dict, restore) -> None:
    """SIGKILL to node2's slurmd while the job trains on node1 and node2. slurmctld would mark the node DOWN
    after SlurmdTimeout (300 s by default); the test does it at once with scontrol, as a node health check
    does. Slurm then ends the job with NODE_FAIL and requeues it (--requeue); up.sh starts the slurmd again and
    the next attempt resumes from the newest complete checkpoint; every earlier one is intact, or replaced by
    newer complete ones as retention does."""
    name, job_id, run_dir = submit(cluster, "slurmd", *SHORT)
    wait_for("the first checkpoint", lambda: latest_step(run_dir) is not None, 240, cluster, name)
    before = complete_checkpoints(run_dir)

    stop_daemon("slurmd-node2", signal.SIGKILL)
    slurm(cluster, "scontrol", "update", "nodename=node2", "state=down", "reason=mbl test: slurmd killed")
    wait_for("the job to be requeued", lambda: status(cluster, name)["state"] == "REQUEUED", 90, cluster, name)
    attempts = slurm(cluster, "sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "State")
    assert "NODE_FAIL" in attempts.split(), attempts  # Slurm's own reason for the requeue

    restore()  # slurmd on node2 again; it reports the orphaned step, which slurmctld ends
    release_requeued(cluster, job_id)
    saved = complete_checkpoints(run_dir)  # the first attempt may have saved once more on its SIGTERM
    assert_no_checkpoint_lost(run_dir, before)
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final

    first = (run_dir / "logs" / "attempt-0.log").read_text() + (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert "Node failure on node2" in first or "DUE TO NODE FAILURE" in first, first[-3000:]
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    assert resumed_step(second) == max(saved) >= max(before), (max(saved), max(before), second[-2000:])
    assert "DONE: the job is complete" in second
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


def test_slurmctld_restart_during_a_job(cluster: dict, restore) -> None:
    """slurmctld stopped (SIGTERM: it saves its state) while the job trains, then started again. Meanwhile
    `mbl status` answers from Slurm's accounting with a warning; the job goes on and completes in its first
    attempt, no checkpoint lost."""
    name, job_id, run_dir = submit(cluster, "ctld", *SHORT)
    wait_for("the trainer's first metrics", lambda: last_step(run_dir) >= 0, 240, cluster, name)

    stop_daemon("slurmctld")
    down = mbl(cluster, "status", name, "-o", "json", check=False)
    restore()
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["state"] == "RUNNING", down.stdout
    assert "warning: slurmctld did not answer" in down.stderr and "sacct" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr

    up = mbl(cluster, "status", name, "-o", "json")
    assert "warning" not in up.stderr, up.stderr
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final
    assert not (run_dir / "logs" / "attempt-1.log").exists()  # no requeue: the job never noticed
    assert "DONE: the job is complete" in (run_dir / "logs" / "attempt-0.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert_no_checkpoint_lost(run_dir, {})
    assert latest_step(run_dir) == STEPS - 10 and (run_dir / "final").is_dir()  # the last step goes to final/


def test_slurmdbd_down_status_list_and_quota_fall_back(cluster: dict, restore, tmp_path: Path) -> None:
    """slurmdbd stopped. A held job is known to squeue; a finished job that slurmctld has already forgotten
    (it purges a job MinJobAge after its end: here a registry record of a job id it never had, whose run
    directory holds DONE) is known only to accounting. Both `mbl status` and `mbl list` still answer, from
    squeue and the run directory, and warn; the quota commands say their answer is incomplete."""
    held, held_id, _ = submit(cluster, "dbd-held", "slurm.sbatch_args.hold=", *SHORT)
    old_dir = cluster["work"] / "runs" / "dbd-old"
    old_dir.mkdir(parents=True)
    (old_dir / "DONE").write_text("")
    Registry(Path(cluster["env"]["MBL_HOME"]) / "registry.db").add(
        JobRef("slurm", "999999", "dbd-old", str(old_dir), {"slurm_conf": cluster["env"].get("SLURM_CONF", "")}),
        team="nlp", kind="pretrain", gpus=2)
    policy = tmp_path / "policy.yaml"
    policy.write_text("teams:\n  nlp: {gpus: 64}\n")
    try:
        stop_daemon("slurmdbd")
        assert subprocess.run(["sacct", "-j", held_id], env=cluster["env"], capture_output=True).returncode != 0

        st = mbl(cluster, "status", held, "-o", "json")  # squeue knows it: nothing missing, no warning
        assert json.loads(st.stdout)["state"] == "PENDING" and "held" in json.loads(st.stdout)["reason"]
        assert "warning" not in st.stderr, st.stderr
        old = mbl(cluster, "status", "dbd-old", "-o", "json")
        assert json.loads(old.stdout)["state"] == "COMPLETED", old.stdout
        assert "Slurm's accounting did not answer; DONE exists" in json.loads(old.stdout)["reason"]
        assert "warning: Slurm's accounting (slurmdbd) did not answer" in old.stderr, old.stderr
        assert "the states come from squeue alone" in old.stderr

        listed = mbl(cluster, "list", "-o", "json")
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows[held]["state"] == "PENDING" and rows["dbd-old"]["state"] == "COMPLETED", rows
        assert listed.stderr.count("warning: Slurm's accounting (slurmdbd) did not answer") == 1, listed.stderr

        shown = mbl(cluster, "quota", "show", "-o", "json")
        report = json.loads(shown.stdout)
        assert "incomplete: the cluster's limits are unknown" in " ".join(report["notes"]), report
        nlp = {r["team"]: r for r in report["teams"]}["nlp"]
        assert nlp["pending_gpus"] >= 2 and nlp["cluster_limit"] is None, nlp

        since = time.strftime("%Y-%m-%d", time.localtime(time.time() - 86400))
        hours = mbl(cluster, "quota", "report", "--since", since, "-o", "json")
        report = json.loads(hours.stdout)
        assert "incomplete: Slurm's accounting did not answer" in " ".join(report["notes"]), report
        assert any(r["team"] == "nlp" and r["jobs"] >= 2 for r in report["rows"]), report
        assert "note: incomplete" in hours.stderr

        # The pre-check of a submission still checks the policy, from squeue's counts, and says so.
        env = {**cluster["env"], "MBL_QUOTA_POLICY": str(policy)}
        sub = subprocess.run(held_submit(cluster, "dbd-checked"), env=env, cwd=cluster["work"],
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr
        assert "warning: quota pre-check: incomplete" in sub.stderr, sub.stderr
    finally:
        restore()
        for job in (held, "dbd-checked"):
            mbl(cluster, "cancel", job, check=False)
    listed = mbl(cluster, "list", "-o", "json")
    assert "warning" not in listed.stderr, listed.stderr  # accounting answers again
    assert {r["name"]: r["state"] for r in json.loads(listed.stdout)}["dbd-old"] == "COMPLETED"


def held_submit(cluster: dict, name: str) -> list[str]:
    """`mbl submit` of a held job (it never runs) of 2 nodes x 1 GPU."""
    return [*MBL, "submit", "--cluster", "slurm", "--profile", str(cluster["profile"]),
            str(ROOT / "examples" / "pretrain-tiny.yaml"), "--set", f"name={name}", "--set", "team=nlp",
            "--set", f"checkpoint.dir={cluster['work'] / 'runs' / name}", "--set", "slurm.sbatch_args.hold=",
            "--set", f"data.train=[{ROOT / 'examples' / 'data' / 'corpus.txt'}]",
            "--set", "distributed.nodes=2", "--set", "distributed.gpus_per_node=1",
            "--set", "resources.cpus_per_gpu=1", "--set", "resources.mem_per_node=1G"]


def _fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_shared_storage_full_during_a_checkpoint(cluster: dict, tmp_path: Path) -> None:
    """The run directory is a real tmpfs of its own. Rank 0 takes 5 s inside the save of step 20
    (MBL_FAULT_SAVE_DELAY), with its temporary folder made and nothing written; meanwhile the test shrinks the
    file system to what is used plus 2 MiB (a checkpoint of this model takes about 10 MB). The save fails with
    ENOSPC: the job ends FAILED (slurm.max_restarts=0: no retry of a full disk) with the error and its fix in
    the log, the temporary folder removed, and `latest` still names step 10, complete and intact."""
    name = f"t-full-{os.urandom(3).hex()}"
    run_dir = cluster["work"] / "runs" / name
    run_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(run_dir)], check=True)
    try:
        name, job_id, _ = submit(cluster, "full", *SHORT, "env.MBL_FAULT_SAVE_DELAY=5@20", "slurm.max_restarts=0",
                                 name=name)
        tmp = run_dir / "checkpoints" / ".tmp-step-00000020"
        deadline, polls = time.monotonic() + 240, 0
        while not tmp.exists():  # rank 0 sleeps 5 s in there: plenty for polls every 0.1 s
            polls += 1
            alive = polls % 20 or state(cluster, job_id) in ("PENDING", "RUNNING")
            assert alive and time.monotonic() < deadline, mbl(cluster, "logs", name, check=False).stdout[-3000:]
            time.sleep(0.1)
        before = complete_checkpoints(run_dir)
        assert list(before) == [10] and latest_step(run_dir) == 10, before
        for _ in range(20):  # rank 1 may be writing its files: measure again when the size no longer fits
            size = _fs_used(run_dir) + 2 * 2**20
            if subprocess.run(["mount", "-o", f"remount,size={size}", str(run_dir)]).returncode == 0:
                break
        else:
            pytest.fail("could not shrink the tmpfs")

        final = wait_done(cluster, name)
        assert final["state"] == "FAILED", final
        assert "restart(s) after failures allowed are used up" in final["reason"], final
        log = (run_dir / "logs" / "attempt-0.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "error: checkpoint step-00000020 could not be written: rank" in log, log[-3000:]
        assert "no space left on device (ENOSPC)" in log, log[-3000:]
        assert "checkpoints/step-00000010 is intact and still `latest`" in log, log[-3000:]
        assert "fix: free space on that file system" in log and "it resumes from checkpoints/step-00000010" in log
        assert not tmp.exists() and not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert_no_checkpoint_lost(run_dir, before)
        assert latest_step(run_dir) == 10
    finally:
        subprocess.run(["scancel", "--name", name], env=cluster["env"], check=False)
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
