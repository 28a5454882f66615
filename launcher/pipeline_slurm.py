"""A pipeline on Slurm: one sbatch job per stage, a sweep as one job array, chained with `afterok`.

    pretrain=$(sbatch --parsable runs/p/pretrain/job.sbatch)
    classify=$(sbatch --parsable --dependency=afterok:${pretrain} --kill-on-invalid-dep=yes \\
               --array=0-3%2 runs/p/_slurm/classify/job.sbatch)

A stage without a sweep is the ordinary job script (launcher/backends/slurm_render.py) in its run directory.
A sweep is one job array over the same script (`slurm_render.Array`): every point already has its own run
directory and full spec (written there at submission), and task i runs point i, choosing its run directory,
and so its spec, by SLURM_ARRAY_TASK_ID; `%max_parallel` throttles it. A task requeues itself alone
(`scontrol requeue <array id>_<task id>`) and keeps its attempt logs and lease in its own run directory.
An array over points of different scripts (a sweep of resources, say) is refused: an array has one script.

`--dependency=afterok:<id>` on an array's id waits for all its tasks to complete; with
`--kill-on-invalid-dep=yes` Slurm cancels the dependants of a stage that failed for good, and `mbl status`
names the stage they waited for (ref.extra["after"], launcher/backends/slurm.py). The whole pipeline is in
Slurm's queue when `mbl submit` returns; nothing waits on this machine.

Re-submitting skips finished points (DONE and summary.json), as locally: an array lists only the unfinished
indices (`--array=1,3%2`), a stage with nothing left is not submitted, and its dependants do not wait for it.

`plan()` is pure (what `mbl render --slurm` prints); `submit()` writes the specs and scripts and runs sbatch.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from launcher.backends.base import JobRef
from launcher.backends.slurm_render import SCRIPT_FILE, Array, script
from launcher.contract import LOGS_DIR, SPEC_FILE
from launcher.errors import MblError, UsageError
from launcher.pipeline import Pipeline, Point, Stage
from launcher.pipeline_run import finished

ARRAY_DIR = "_slurm"  # <runs_dir>/_slurm/<stage>/: an array's script and Slurm's --output files (no stage is "_")


@dataclass
class StageJob:
    """One sbatch submission: a stage's job, or its sweep's array over the `points` still to run."""

    stage: Stage
    points: list[Point]
    script_path: str
    script: str
    array: Array | None = None
    options: list[str] = field(default_factory=list)  # --array (dependencies are added at submission)

    @property
    def name(self) -> str:
        return self.array.name if self.array else self.points[0].name

    def command(self, after: dict[str, str]) -> list[str]:
        """sbatch's command line, waiting for the upstream stages' job ids in `after` (stage -> id)."""
        deps = [f"--dependency=afterok:{':'.join(after.values())}", "--kill-on-invalid-dep=yes"] if after else []
        return ["sbatch", "--parsable", *deps, *self.options, self.script_path]


def array_dir(stage: Stage) -> str:
    """Where a stage's array keeps its script and Slurm's --output files: beside its points' run directories."""
    return str(Path(stage.points[0].run_dir).parent / ARRAY_DIR / stage.name)


def plan(pipeline: Pipeline, profile: Any, skip_finished: bool = True) -> tuple[list[StageJob], list[Point]]:
    """The submissions, in dependency order, and the points skipped as finished. Pure but for reading the run
    directories' DONE (`skip_finished=False` for a render that shows every point). UsageError when a sweep's
    points would need different scripts."""
    jobs: list[StageJob] = []
    skipped: list[Point] = []
    for stage in pipeline.stages:
        todo = [p for p in stage.points if not (skip_finished and finished(p))]
        skipped += [p for p in stage.points if p not in todo]
        if not todo:
            continue
        if not stage.swept:
            point = todo[0]
            jobs.append(StageJob(stage, todo, f"{point.run_dir}/{SCRIPT_FILE}", script(point.spec, profile)))
            continue
        indices = [p.index for p in todo]
        if indices == list(range(len(stage.points))):
            tasks = f"0-{len(stage.points) - 1}"
        else:
            tasks = ",".join(str(i) for i in indices)
        tasks += f"%{stage.parallel(local=False)}"
        folder = array_dir(stage)
        from launcher.sweep import job_name

        array = Array(job_name(pipeline.name, stage.name), tuple(p.name for p in stage.points),
                      tuple(p.run_dir for p in stage.points), tasks, folder)
        texts = [script(p.spec, profile, array) for p in stage.points]
        differ = [p for p, t in zip(stage.points, texts) if t != texts[0]]
        if differ:
            keys = sorted({k for p in stage.points for k in p.overrides})
            raise UsageError(
                f"stage {stage.name}: sweep point {differ[0].index} ({differ[0].label}) needs another batch script "
                f"than point 0, and a job array has one script (sweep keys: {', '.join(keys)})",
                hint="sweep only what the trainer reads (train.*, data.*, model.*, task.*); put resources, "
                     "distributed and slurm settings in the stage's set:, or split the sweep into stages")
        jobs.append(StageJob(stage, todo, f"{folder}/{SCRIPT_FILE}", texts[0], array, [f"--array={tasks}"]))
    return jobs, skipped


def render(pipeline: Pipeline, profile: Any) -> str:
    """What `mbl render --slurm PIPELINE` prints: the submissions as a shell would run them, then each script."""
    jobs, _ = plan(pipeline, profile, skip_finished=False)
    var = {j.stage.name: j.stage.name.replace("-", "_") for j in jobs}
    lines = ["# slurm: one sbatch per stage, a sweep as one job array, chained with afterok; each prints its job id"]
    for job in jobs:
        after = {s: f"${{{var[s]}}}" for s in job.stage.after if s in var}
        words = [w if w.startswith("--dependency=") else shlex.quote(w) for w in job.command(after)]
        lines.append(f"{var[job.stage.name]}=$({' '.join(words)})")
    parts = ["\n".join(lines)]
    for job in jobs:
        parts.append(f"# ---- {job.script_path} ----\n{job.script.rstrip()}")
    return "\n".join(parts) + "\n"


def check(pipeline: Pipeline, jobs: list[StageJob], registry: Any, backend_for: Callable[[str], Any]) -> None:
    """What `mbl submit` checks of one job, for every point to run, before anything is submitted: no job still
    writes its run directory, and that holds the same spec (resume) or none."""
    from launcher.rundir import check_run_dir, refuse_live_writer

    for job in jobs:
        for point in job.points:
            refuse_live_writer(point.spec, registry, backend_for)
            check_run_dir(point.spec)


def submit(pipeline: Pipeline, backend: Any, registry: Any, echo: Callable[[str], None]) -> int:
    """Submit every stage still to run, in dependency order; 0, or raise (cancelling what this call submitted)
    when sbatch refuses one."""
    from launcher.rundir import write_spec

    jobs, skipped = plan(pipeline, backend.profile.slurm)
    for point in skipped:
        echo(f"{point.stage}[{point.index}] {point.label or point.name}: finished before, skipped")
    ids: dict[str, str] = {}
    submitted: list[JobRef] = []
    try:
        for job in jobs:
            after = {s: ids[s] for s in job.stage.after if s in ids}
            for point in job.points:
                write_spec(point.spec)
                (Path(point.run_dir) / LOGS_DIR).mkdir(parents=True, exist_ok=True)
            path = Path(job.script_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(job.script)
            tmp.replace(path)
            job_id = backend.sbatch(job.command(after), job.points[0].spec, path)
            ids[job.stage.name] = job_id
            extra = {"script": str(path), "pipeline": pipeline.name, "stage": job.stage.name,
                     "after": [{"stage": s, "job_id": i} for s, i in after.items()]}
            if os.environ.get("SLURM_CONF"):
                extra["slurm_conf"] = os.environ["SLURM_CONF"]
            spec0 = job.points[0].spec
            if job.array is None:
                ref = JobRef("slurm", job_id, spec0.name, spec0.run_dir, extra)
                (Path(spec0.run_dir) / LOGS_DIR / f"job-{job_id}.sbatch").write_text(job.script)
                submitted.append(ref)
                registry.add(ref, team=spec0.team, kind=spec0.kind, gpus=spec0.total_gpus)
                echo(f"{job.stage.name}: job {job_id} ({ref.name}), run dir {ref.run_dir}"
                     + (f", after {_after(after)}" if after else ""))
                continue
            tasks = [(f"{job_id}_{p.index}", p.run_dir) for p in job.points]
            array_ref = JobRef("slurm", job_id, job.array.name, job.array.log_dir, {**extra, "array_tasks": tasks})
            submitted.append(array_ref)
            registry.add(array_ref, team=spec0.team, kind=spec0.kind, gpus=0)
            for point, (task_id, _run_dir) in zip(job.points, tasks):
                (Path(point.run_dir) / LOGS_DIR / f"job-{task_id}.sbatch").write_text(job.script)
                ref = JobRef("slurm", task_id, point.name, point.run_dir, {**extra, "point": point.index})
                registry.add(ref, team=point.spec.team, kind=point.spec.kind, gpus=point.spec.total_gpus)
            echo(f"{job.stage.name}: job array {job_id} ({job.array.name}), {len(job.points)} of "
                 f"{len(job.stage.points)} point(s), {job.array.tasks.split('%')[1]} at a time"
                 + (f", after {_after(after)}" if after else ""))
            for point in job.points:
                echo(f"    {job_id}_{point.index}  {point.name}  {point.run_dir}")
    except MblError:
        for ref in submitted:  # a half-submitted pipeline would run stages whose dependants never come
            try:
                backend._run(["scancel", ref.job_id], ref, check=False)
            except MblError:
                pass
        if submitted:
            echo("cancelled what this submission had queued: " + ", ".join(r.job_id for r in submitted))
        raise
    if not jobs:
        echo(f"pipeline {pipeline.name}: every point finished before; results: mbl results {pipeline.path}")
    else:
        echo(f"pipeline {pipeline.name}: submitted {len(jobs)} job(s); mbl list shows them, "
             f"mbl results {pipeline.path} once they finish")
    return 0


def _after(after: dict[str, str]) -> str:
    return ", ".join(f"{s} (afterok:{i})" for s, i in after.items())


__all__ = ["SPEC_FILE", "StageJob", "plan", "render", "check", "submit"]
