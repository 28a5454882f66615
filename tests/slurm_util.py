"""Helpers and the `cluster` fixture for tests on the real local Slurm cluster (slurm/dev/up.sh).

Registered as a pytest plugin by conftest.py, so that every Slurm test module shares them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

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


def submit(cluster: dict, tag: str, *sets: str, name: str | None = None) -> tuple[str, str, Path]:
    name = name or f"t-{tag}-{uuid.uuid4().hex[:6]}"
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


def release_requeued(cluster: dict, job_id: str, timeout: float = 90, stepd_id: str | None = None,
                     count_restarts: bool = True) -> None:
    """A requeued job pends ~2 min with reason BeginTime; start it at once. An array task is `<array>_<task>`
    for squeue and scontrol while the node's slurmstepd names it by its own number: `stepd_id`."""
    def pending_on_begin_time() -> bool:
        out = slurm(cluster, "squeue", "--noheader", "--jobs", job_id, "-O", "State:|,Reason:|,RestartCnt:|")
        state, reason, restarts = (out.strip().split("|") + ["", "", ""])[:3]
        return (state == "PENDING" and reason == "BeginTime"
                and (not count_restarts or restarts not in ("", "0")))

    wait_for(f"job {job_id} to pend after its requeue", pending_on_begin_time, timeout)

    # The previous attempt must be gone from the nodes first: started while its slurmstepd still runs, the
    # new attempt is killed with "Job credential revoked" (Slurm's own BeginTime delay avoids that race).
    def previous_attempt_gone() -> bool:
        marker = f"slurmstepd: [{stepd_id or job_id}.".encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmdline.read_bytes().startswith(marker):
                    return False
            except OSError:
                continue
        return True

    wait_for(f"the previous attempt of job {job_id} to leave the nodes", previous_attempt_gone, 60)
    time.sleep(2)
    slurm(cluster, "scontrol", "update", f"jobid={job_id}", "starttime=now")


def wait_done(cluster: dict, name: str, timeout: float = 240) -> dict:
    job_id = status(cluster, name)["job_id"]
    wait_for(f"{name} to end", lambda: state(cluster, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout, cluster, name)
    return status(cluster, name)
