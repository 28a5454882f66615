"""A pipeline on Slurm (launcher/pipeline_slurm.py): one sbatch job per stage, a sweep as one job array,
chained with afterok.

The first tests need no cluster: the render (the sbatch lines, the array script), skipping finished points,
the states of array tasks from captured squeue/sacct output, the words for a failed dependency. The last ones
run a tiny pipeline on the real local cluster (slurm/dev/up.sh): a pre-train of a few steps, then a 2-point
sweep as a job array; one task requeued resumes alone; a pre-train that fails gets its dependants cancelled
and `mbl status` says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from slurm_util import ROOT, mbl, release_requeued, slurm, wait_for

from launcher.backends.base import JobRef, JobState, JobStatus
from launcher.backends.slurm import SlurmBackend, aggregate, dependency_words
from launcher.contract import DONE_FILE
from launcher.errors import UsageError
from launcher.pipeline import load_pipeline
from launcher.pipeline_slurm import plan, render
from launcher.profile import Profile

PROFILE = Profile.model_validate({"name": "t", "slurm": {
    "version": "23.11", "partitions": [{"name": "gpu", "gpu_types": ["fake"], "default": True}],
    "container_runtime": "none", "shared_root": "/", "setup": ["source /opt/venv/bin/activate"]}}).slurm

SMALL = {"team": "nlp", "data.train": [str(ROOT / "examples" / "data" / "corpus.txt")],
         "distributed.gpus_per_node": 1, "resources.mem_per_node": "1G", "train.warmup_steps": 2,
         "train.global_batch_size": 16, "train.eval_every_steps": 5, "checkpoint.every_steps": 5}


def write_pipeline(tmp: Path, pre: dict | None = None, sweep_set: dict | None = None,
                   grid: dict | None = None) -> Path:
    """A pre-train of a few steps, then a sweep of 2 seeds of another tiny pre-train after it."""
    import yaml

    spec = str(ROOT / "examples" / "pretrain-tiny.yaml")
    data = {"kind": "pipeline", "name": "tp", "runs_dir": str(tmp / "runs" / "{name}"), "stages": {
        "pretrain": {"spec": spec, "set": {**SMALL, "train.max_steps": 5, **(pre or {})}},
        "again": {"spec": spec, "after": ["pretrain"], "set": {  # the pre-train's data, prepared once
            **SMALL, "data.train": [], "data.prepared": "${stages.pretrain.run_dir}", "train.max_steps": 10,
            **(sweep_set or {})},
                  "sweep": {"grid": grid or {"train.seed": [0, 1]}, "max_parallel": 2}}}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- no cluster -----------------------------------------------------------------------------------------


def test_render_chains_stages_and_makes_the_sweep_one_array(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path))
    text = render(pipeline, PROFILE)
    runs = tmp_path / "runs" / "tp"
    assert f"pretrain=$(sbatch --parsable {runs}/pretrain/job.sbatch)" in text
    assert (f"again=$(sbatch --parsable --dependency=afterok:${{pretrain}} --kill-on-invalid-dep=yes "
            f"--array=0-1%2 {runs}/_slurm/again/job.sbatch)") in text
    array = text.split(f"# ---- {runs}/_slurm/again/job.sbatch ----\n")[1]
    assert "#SBATCH --array=0-1%2" in array and "#SBATCH --job-name=tp-again" in array
    assert f"#SBATCH --output={runs}/_slurm/again/slurm-%A_%a.out" in array
    # The task picks its run directory (and so its spec and name) by SLURM_ARRAY_TASK_ID...
    assert f"run_dirs=( {runs}/again-seed0 {runs}/again-seed1 )" in array.replace(" \\\n  ", " ")
    assert 'run_dir="${run_dirs[task]}"' in array and 'MBL_JOB_NAME="${job_names[task]}"' in array
    assert '--spec "${run_dir}"/spec.yaml' in array
    # ...and requeues itself alone, named as squeue names it; the lease owner is the task.
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in array
    assert 'MBL_JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in array
    assert "${SLURM_JOB_ID}\"" not in array.split("# Rendezvous")[1].split("MASTER_PORT")[0]
    for script in text.split("# ---- ")[1:]:
        body = script.split(" ----\n", 1)[1]
        subprocess.run(["bash", "-n"], input=body, text=True, check=True)
        if shutil.which("shellcheck"):
            proc = subprocess.run(["shellcheck", "-s", "bash", "-"], input=body, text=True, capture_output=True)
            assert proc.returncode == 0, proc.stdout


def test_the_single_stage_script_is_the_plain_job_script(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path))
    backend = SlurmBackend()
    backend._profile = Profile.model_validate({"name": "t", "slurm": PROFILE.model_dump()})
    jobs, _ = plan(pipeline, PROFILE)
    point = pipeline.stage("pretrain").points[0]
    assert jobs[0].script == backend.dryrun(point.spec).files["job.sbatch"]


def test_a_resubmission_arrays_only_the_unfinished_points(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path))
    for point in [pipeline.stage("pretrain").points[0], pipeline.stage("again").points[0]]:
        Path(point.run_dir).mkdir(parents=True)
        (Path(point.run_dir) / DONE_FILE).write_text("")
        (Path(point.run_dir) / "summary.json").write_text('{"steps": 5}')
    jobs, skipped = plan(pipeline, PROFILE)
    assert [p.name for p in skipped] == ["tp-pretrain", "tp-again-seed0"]
    assert [j.stage.name for j in jobs] == ["again"]
    assert jobs[0].command({}) == ["sbatch", "--parsable", "--array=1%2", jobs[0].script_path]
    assert jobs[0].command({"pretrain": "7"})[2:4] == ["--dependency=afterok:7", "--kill-on-invalid-dep=yes"]


def test_a_sweep_that_changes_the_script_is_refused(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, grid={"resources.mem_per_node": ["1G", "2G"]}))
    with pytest.raises(UsageError, match="a job array has one script"):
        plan(pipeline, PROFILE)


class Answers:
    """Stands in for SlurmBackend._run: squeue and sacct answer with captured output of array 3378."""

    def __init__(self, squeue: str, sacct: str):
        self.out = {"squeue": squeue, "sacct": sacct}
        self.calls: list[list[str]] = []

    def __call__(self, args, ref=None, check=True, timeout=60):
        self.calls.append(args)
        return subprocess.CompletedProcess(args, 0, self.out[args[0]], "")


def test_array_tasks_are_found_by_their_pair_and_the_array_sums_them_up() -> None:
    b = SlurmBackend()
    # squeue -O JobID,...,JobArrayID: a running task's JobID is its own number; a pending task's is the array's.
    b._run = Answers("3380|RUNNING|None|0|node1|3378_0|\n3378|PENDING|JobArrayTaskLimit|0||3378_1|\n", "")
    tasks = [("3378_0", "/r/a0"), ("3378_1", "/r/a1")]
    refs = [JobRef("slurm", "3378_0", "a0", "/r/a0"), JobRef("slurm", "3378", "tp-again", "/r/_slurm",
                                                            {"array_tasks": tasks})]
    got = b.statuses(refs)
    assert got[0].state == JobState.RUNNING
    assert got[1].state == JobState.RUNNING and got[1].detail == "tasks: 1 RUNNING, 1 PENDING"
    assert "--jobs" in b._run.calls[0] and "3378_0,3378_1" in b._run.calls[0]


def test_a_task_cancelled_for_its_failed_dependency_says_which() -> None:
    b = SlurmBackend()
    # sacct of an array cancelled before any task started: only the array's row, `<id>_[0-1%2]`, reason Dependency.
    b._run = Answers("", "3376|tp-again|CANCELLED|0:0|Dependency|00:00:00|None assigned|3376_[0-1%2]\n")
    ref = JobRef("slurm", "3376_1", "tp-again-seed1", "/r/a1", {"after": [{"stage": "pretrain", "job_id": "3375"}]})
    got = b.status(ref)
    assert got.state == JobState.CANCELLED
    assert got.reason == "cancelled by Slurm: its dependency pretrain (job 3375) did not complete"
    assert ["sacct", "--jobs", "3376"] == b._run.calls[1][:3]
    # cancelled by a person (scancel): not the dependency's doing
    b._run = Answers("", "3376|tp-again|CANCELLED by 0|0:0|Dependency|00:00:00|None assigned|3376_[0-1%2]\n")
    assert b.status(ref).reason == "cancelled by 0"


def test_words_and_sums() -> None:
    assert dependency_words([], pending=True) == "will never start: its dependency a job it needs did not complete"
    two = [{"stage": "a", "job_id": "1"}, {"stage": "b", "job_id": "2"}]
    assert "one of its dependencies a (job 1) and b (job 2)" in dependency_words(two, pending=False)
    st = aggregate([JobStatus(JobState.COMPLETED), JobStatus(JobState.FAILED, "bad data")], ["1_0", "1_1"])
    assert st.state == JobState.FAILED and st.reason == "task 1_1: bad data"
    assert aggregate([JobStatus(JobState.COMPLETED)] * 2, ["1_0", "1_1"]).state == JobState.COMPLETED


# ---- on the real cluster --------------------------------------------------------------------------------


def submit_pipeline(cluster: dict, path: Path) -> str:
    return mbl(cluster, "submit", "--slurm", "--profile", str(cluster["profile"]), str(path)).stderr


def job_state(cluster: dict, name: str) -> dict:
    return json.loads(mbl(cluster, "status", name, "-o", "json").stdout)


def release_task(cluster: dict, task: str, raw: str) -> None:
    """slurm_util.release_requeued for an array task `<array>_<task>`, whose slurmstepd is named `raw`."""
    release_requeued(cluster, task, stepd_id=raw, count_restarts=False)


def task_ids(cluster: dict, array_id: str) -> list[str]:
    out = slurm(cluster, "sacct", "-j", array_id, "-X", "--noheader", "--parsable2", "--format=JobID")
    return sorted(x for x in out.split() if x.startswith(f"{array_id}_") and "[" not in x)


@pytest.mark.slurm
def test_pipeline_runs_as_a_job_and_an_array_and_a_requeued_task_resumes_alone(cluster: dict,
                                                                                 tmp_path: Path) -> None:
    t0 = time.monotonic()
    path = write_pipeline(tmp_path)
    err = submit_pipeline(cluster, path)
    pre_id = err.split("pretrain: job ")[1].split()[0]
    array_id = err.split("again: job array ")[1].split()[0]
    assert f"after pretrain (afterok:{pre_id})" in err
    shown = slurm(cluster, "scontrol", "show", "job", array_id)
    assert f"Dependency=afterok:{pre_id}" in shown and "ArrayTaskThrottle=2" in shown, shown
    runs = tmp_path / "runs" / "tp"
    seed0, seed1 = runs / "again-seed0", runs / "again-seed1"
    assert (seed0 / "spec.yaml").exists() and (seed1 / "spec.yaml").exists()  # written at submission

    # Requeue task 1 once it has a checkpoint; task 0 runs on.
    wait_for("task 1's first checkpoint", lambda: (seed1 / "latest").exists(), 150, cluster, "tp-again-seed1")
    raw = slurm(cluster, "squeue", "--noheader", "--jobs", f"{array_id}_1", "-O", "JobID").strip()
    slurm(cluster, "scontrol", "requeue", f"{array_id}_1")
    release_task(cluster, f"{array_id}_1", raw)
    wait_for("the array to end", lambda: job_state(cluster, "tp-again")["state"] in ("COMPLETED", "FAILED",
                                                                                     "CANCELLED"), 150)
    final = job_state(cluster, "tp-again")
    assert final["state"] == "COMPLETED", final
    assert task_ids(cluster, array_id) == [f"{array_id}_0", f"{array_id}_1"]
    assert job_state(cluster, "tp-pretrain")["state"] == "COMPLETED"
    # Task 1 had a second attempt that resumed from its checkpoint; task 0 had one attempt.
    second = (seed1 / "logs" / "attempt-1.log").read_text()
    assert "resumed from checkpoints/step-" in second and f"mbl: job {array_id}_1 attempt 1" in second, second[-2000:]
    assert not (seed0 / "logs" / "attempt-1.log").exists()
    # sacct --duplicates keeps every attempt's row: two for task 1 (REQUEUED, then COMPLETED), one for task 0.
    rows = slurm(cluster, "sacct", "-j", f"{array_id}_0,{array_id}_1", "-X", "--duplicates", "--noheader",
                 "--parsable2", "--format=JobID,State").split()
    assert sorted(rows) == [f"{array_id}_0|COMPLETED", f"{array_id}_1|COMPLETED", f"{array_id}_1|REQUEUED"], rows
    for run_dir in (seed0, seed1):
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
    names = {r["name"]: r for r in json.loads(mbl(cluster, "list", "-o", "json").stdout)}
    assert names["tp-again-seed1"]["job_id"] == f"{array_id}_1"
    # Submitting again skips every finished point.
    assert "every point finished before" in submit_pipeline(cluster, path)
    print(f"slurm pipeline with a requeued task: {time.monotonic() - t0:.0f}s")


@pytest.mark.slurm
def test_a_failed_pretrain_cancels_its_dependants_and_status_says_why(cluster: dict, tmp_path: Path) -> None:
    t0 = time.monotonic()
    path = write_pipeline(tmp_path, pre={"data.train": [str(tmp_path / "no-such-corpus.txt")]})
    err = submit_pipeline(cluster, path)
    pre_id = err.split("pretrain: job ")[1].split()[0]
    wait_for("the dependants to be cancelled",
             lambda: job_state(cluster, "tp-again-seed0")["state"] == "CANCELLED", 90, cluster, "tp-pretrain")
    assert job_state(cluster, "tp-pretrain")["state"] == "FAILED"
    for name in ("tp-again-seed0", "tp-again-seed1", "tp-again"):
        row = job_state(cluster, name)
        assert row["state"] == "CANCELLED", row
        assert f"cancelled by Slurm: its dependency pretrain (job {pre_id}) did not complete" in row["reason"], row
    assert "DependencyNeverSatisfied" not in mbl(cluster, "status", "tp-again-seed1").stdout
    print(f"slurm pipeline with a failed pre-train: {time.monotonic() - t0:.0f}s")


def test_cli_render_and_dry_run_print_the_sbatch_lines_and_submit_nothing(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from launcher.cli import cli

    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "slurm": PROFILE.model_dump(mode="json")}))
    path = write_pipeline(tmp_path)
    for args in (["render", "--slurm"], ["submit", "--slurm", "--dry-run"]):
        result = CliRunner().invoke(cli, [*args, "--profile", str(profile), str(path)])
        assert result.exit_code == 0, result.output
        assert "again: pretrain, after pretrain, sweep of 2 point(s), 2 at a time" in result.output
        assert "--dependency=afterok:${pretrain} --kill-on-invalid-dep=yes --array=0-1%2" in result.output
    assert not (tmp_path / "runs").exists()
