"""Team GPU quotas on the real local Slurm cluster: apply, pre-check refusal, the cluster's backstop, report."""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import date

import pytest

from launcher.quota import gpus_in_tres
from slurm_util import ROOT, mbl, slurm, state, status, wait_for

pytestmark = pytest.mark.slurm

POLICY = """\
teams:
  nlp: {gpus: 4, max_gpus_per_job: 4, max_wall: "1-00:00:00", partitions: [gpu]}
  vision: {gpus: 8, max_gpus_per_job: 8}
"""


def four_gpu_args(cluster, name, *extra):
    return ["submit", "--cluster", "slurm", "--profile", str(cluster["profile"]),
            str(ROOT / "examples" / "pretrain-tiny.yaml"), "--set", f"name={name}", "--set", "team=nlp",
            "--set", f"checkpoint.dir={cluster['work'] / 'runs' / name}",
            "--set", f"data.train=[{ROOT / 'examples' / 'data' / 'corpus.txt'}]",
            "--set", "distributed.nodes=2", "--set", "distributed.gpus_per_node=2",
            "--set", "train.global_batch_size=64", "--set", "train.max_steps=5000",
            "--set", "resources.cpus_per_gpu=1", "--set", "resources.mem_per_node=1G", *extra]


def test_policy_precheck_backstop_and_report(cluster, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    cluster["env"]["MBL_QUOTA_POLICY"] = str(policy)
    jobs = []
    # The numbers below assume team nlp holds no GPUs yet: let jobs of earlier tests leave the queue first.
    wait_for("team nlp's earlier jobs to leave the queue",
             lambda: not slurm(cluster, "squeue", "-h", "-A", "nlp", "-o", "%i").strip(), 180)
    try:
        # 1. the policy becomes the cluster's own limits
        mbl(cluster, "quota", "apply", "--cluster", "slurm", str(policy), "--yes")
        out = slurm(cluster, "sacctmgr", "-nP", "show", "assoc", "where", "account=nlp,vision",
                    "format=account,user,grptres,maxtresperjob,maxwall")
        rows = {line.split("|")[0]: line for line in out.splitlines() if line.split("|")[1] == ""}
        assert rows["nlp"] == "nlp||gres/gpu=4|gres/gpu=4|1-00:00:00"
        assert rows["vision"] == "vision||gres/gpu=8|gres/gpu=8|"

        # 2. a first 4-GPU job of team nlp runs
        first = f"q-first-{uuid.uuid4().hex[:6]}"
        mbl(cluster, *four_gpu_args(cluster, first))
        first_id = status(cluster, first)["job_id"]
        jobs.append(first_id)
        wait_for("the first job to run", lambda: state(cluster, first_id) == "RUNNING", 90, cluster, first)
        shown = {r["team"]: r for r in json.loads(mbl(cluster, "quota", "show", "-o", "json").stdout)}
        assert shown["nlp"]["running_gpus"] == 4 and shown["nlp"]["free"] == 0

        # 3. a second one is refused before it queues, with the numbers
        second = f"q-second-{uuid.uuid4().hex[:6]}"
        refused = mbl(cluster, *four_gpu_args(cluster, second), check=False)
        assert refused.returncode == 2, refused.stderr
        assert "team nlp: the job asks 4 GPUs, 4 are in use (running or pending), 4 allowed" in refused.stderr
        assert "Traceback" not in refused.stderr

        # 4. past the pre-check, the cluster's GrpTRES holds it: pending on AssocGrpGRES, explained
        mbl(cluster, *four_gpu_args(cluster, second, "--no-quota-check"))
        second_id = status(cluster, second)["job_id"]
        jobs.append(second_id)

        def waits_for_quota():
            row = status(cluster, second)
            return row["state"] == "PENDING" and "quota" in row["reason"] and row

        row = wait_for("the second job to pend on the team's quota", waits_for_quota, 60, cluster, second)
        assert "GPU quota" in row["reason"]
        reason = slurm(cluster, "squeue", "-h", "-j", second_id, "-o", "%r").strip()
        assert reason == "AssocGrpGRES"
    finally:
        for job_id in jobs:
            subprocess.run(["scancel", job_id], env=cluster["env"], capture_output=True)
    for job_id in jobs:
        wait_for(f"job {job_id} to end", lambda j=job_id: state(cluster, j) in ("CANCELLED", "COMPLETED", "FAILED"),
                 90)

    # 5. GPU-hours of these jobs equal what sacct says. slurmdbd records a job's end asynchronously (a job
    # cancelled while pending shows in a --starttime window a little later than under -j): wait for both.
    def report_with_both():
        rows = json.loads(mbl(cluster, "quota", "report", "--since", date.today().isoformat(), "--by", "job",
                              "-o", "json").stdout)
        by_job = {r["job"]: r for r in rows}
        return set(jobs) <= set(by_job) and by_job

    report = wait_for("the report to list both jobs", report_with_both, 60)
    for job_id in jobs:
        tres, elapsed = slurm(cluster, "sacct", "-X", "-n", "-P", "-j", job_id, "-o", "AllocTRES,ElapsedRaw"
                              ).strip().split("|")
        assert report[job_id]["gpu_hours"] == round(gpus_in_tres(tres) * int(elapsed) / 3600, 4)
    assert report[jobs[0]]["gpu_hours"] > 0
