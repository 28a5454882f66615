"""Containerized jobs on the real local Slurm cluster: Slurm's own OCI containers (oci.conf + runc).

The trainer image (images/build.sh) becomes an OCI bundle (images/bundle.sh); slurm/dev/up.sh writes oci.conf
with images/oci-run as RunTimeRun; the profile of `make_dev_profile.py --runtime oci` mounts
<MBL_SLURM_DIR>/shared into the container, where these tests keep their run directories and data.

- `mbl submit --cluster slurm` of the tiny pre-train, 2 nodes x 1 rank in the container, `scontrol requeue`
  mid-run: the ranks inside the container save on Slurm's SIGTERM, the next attempt resumes from that save,
  and the job completes at the same final step; no runc container outlives its step.
- the same job script submitted by a non-root user (rootless runc): every file of the run directory,
  written from inside the container, belongs to that user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from container_util import SLURM_DIR, bundle, owners, require_image
from slurm_util import (
    EVERY,
    MBL,
    STEPS,
    last_step,
    mbl,
    release_requeued,
    slurm,
    state,
    status,
    wait_done,
    wait_for,
)

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SHARED = SLURM_DIR / "shared"
DEV_USER = os.environ.get("MBL_SLURM_DEV_USER", "mbluser")


@pytest.fixture(scope="module")
def oci(cluster: dict) -> dict:
    image = require_image()
    if not (SLURM_DIR / "oci.conf").exists():
        pytest.fail(f"{SLURM_DIR}/oci.conf is missing: run slurm/dev/up.sh (it writes it)")
    path = bundle(image, SLURM_DIR / "bundles" / "mbl-trainer")
    work = SHARED / f"pytest-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "data" / "corpus.txt", work / "corpus.txt")
    profile = work / "profile-oci.yaml"
    subprocess.run([sys.executable, str(ROOT / "slurm" / "make_dev_profile.py"), "--runtime", "oci",
                    "--shared-root", str(SHARED), "-o", str(profile)], check=True)
    yield {**cluster, "work": work, "profile": profile, "bundle": path}
    shutil.rmtree(work, ignore_errors=True)


def spec_args(oci: dict, name: str, run_dir: Path) -> list[str]:
    sets = [
        f"name={name}", "team=ops", f"image={oci['bundle']}", f"checkpoint.dir={run_dir}",
        f"data.train=[{oci['work'] / 'corpus.txt'}]",
        "distributed.nodes=2", "distributed.gpus_per_node=1", "resources.cpus_per_gpu=1", "resources.mem_per_node=1G",
        f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", f"train.eval_every_steps={EVERY}",
        "train.warmup_steps=5",
    ]
    return ["--cluster", "slurm", "--profile", str(oci["profile"]), str(ROOT / "examples" / "pretrain-tiny.yaml"),
            *(x for s in sets for x in ("--set", s))]


def containers_of(job_id: str) -> list[str]:
    """runc containers of a job still known to runc on this machine (oci.conf's state folders)."""
    found = []
    for state_dir in (SLURM_DIR / "oci-state").glob("*"):
        for entry in state_dir.iterdir() if state_dir.is_dir() else []:
            if f".{job_id}." in entry.name:
                found.append(entry.name)
    return found


def test_oci_two_node_pretrain_requeued_resumes_and_completes(oci: dict) -> None:
    name = f"t-oci-{uuid.uuid4().hex[:6]}"
    run_dir = oci["work"] / "runs" / name
    mbl(oci, "submit", *spec_args(oci, name, run_dir))
    job_id = status(oci, name)["job_id"]
    script = (run_dir / "job.sbatch").read_text()
    assert f"--container={oci['bundle']}" in script and "MBL_CONTAINER_MOUNTS=" in script

    wait_for("a periodic checkpoint", lambda: last_step(run_dir) > EVERY + 5, 240, oci, name)
    slurm(oci, "scontrol", "requeue", job_id)
    release_requeued(oci, job_id)
    final = wait_done(oci, name, timeout=300)
    assert final["state"] == "COMPLETED", final

    first = (run_dir / "logs" / "attempt-0.log").read_text()
    second = (run_dir / "logs" / "attempt-1.log").read_text()
    # Both nodes ran the trainer in the container (images/oci-run logs each step it starts).
    for log in (first, second):
        assert f"0: mbl oci-run: node1.root.{job_id}." in log and f"1: mbl oci-run: node2.root.{job_id}." in log, \
            log[-3000:]
    assert "mbl: SIGTERM" in first, first[-3000:]
    # Slurm's SIGTERM reached the ranks inside the container: they saved past the last periodic checkpoint,
    # and the next attempt resumed from that save and finished at the same final step.
    resumed = int(second.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)
    assert resumed > EVERY, second[-3000:]
    assert "DONE: the job is complete" in second
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (run_dir / "final").is_dir() and (run_dir / "DONE").exists()
    # Written from inside the container, owned by the submitter; no container outlived its step.
    assert owners(run_dir) == {(os.getuid(), os.getgid())}
    assert containers_of(job_id) == []


def test_oci_job_of_a_non_root_user_writes_files_it_owns(oci: dict) -> None:
    """The same job script, submitted by another user: rootless runc, the run directory is theirs."""
    try:
        user = pwd.getpwnam(DEV_USER)
    except KeyError:
        pytest.fail(f"user {DEV_USER} is missing: run slurm/dev/up.sh (it creates it)")
    name = f"t-oci-user-{uuid.uuid4().hex[:6]}"
    home = oci["work"] / DEV_USER
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True)
    # root renders (the user cannot run this checkout's venv here); the user submits the script as is.
    proc = subprocess.run([*MBL, "render", *spec_args(oci, name, run_dir), "-o", str(run_dir)], env=oci["env"],
                          cwd=home, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    (run_dir / "logs").mkdir()  # sbatch's --output goes there (mbl submit makes it)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
    out = subprocess.run(["runuser", "-u", DEV_USER, "--", "sbatch", "--parsable", str(run_dir / "job.sbatch")],
                         env=oci["env"], cwd=home, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_for(f"job {job_id} to end", lambda: state(oci, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             300)
    log = (run_dir / "logs" / "attempt-0.log").read_text()
    assert state(oci, job_id) == "COMPLETED", log[-3000:]
    assert f"mbl oci-run: node1.{DEV_USER}.{job_id}.0.0: " in log and f"as {user.pw_uid}:{user.pw_gid}" in log
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert owners(run_dir) == {(user.pw_uid, user.pw_gid)}, sorted(owners(run_dir))
