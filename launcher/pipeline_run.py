"""A pipeline on this machine: stages in dependency order, the points of a sweep `max_parallel` at a time.

Each point is an ordinary local job (launcher/backends/local.py: `submit(dryrun(spec))`, recorded in the
registry, so `mbl status`, `logs` and `cancel` work on it by its name). Before anything starts, every point's
run directory is checked as `mbl submit` checks one (the same spec or none, no live writer). A point whose run
directory is finished (DONE and summary.json) is skipped; any other starts, and the trainer resumes it from its
newest checkpoint. A stage fails when any of its points fails; the stages after it do not run, and say why.
Ctrl-C asks the running points to save and stop; the next submission resumes them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from launcher.backends.base import JobRef, JobState
from launcher.contract import DONE_FILE
from launcher.pipeline import Pipeline, Point, Stage
from launcher.progress import duration, number, snapshot
from launcher.summary import read_summary

POLL_SECONDS = 1.0
PROGRESS_EVERY = 30.0
START_GRACE = 10.0  # seconds a just-started supervisor may take to show up in /proc


def finished(point: Point) -> bool:
    """The point's run directory holds a finished job: DONE and its summary."""
    return (Path(point.run_dir) / DONE_FILE).exists() and read_summary(point.run_dir) is not None


def check_points(pipeline: Pipeline, registry, backend_for: Callable[[str], object]) -> None:
    """What `mbl submit` checks of one job, for every point, before anything starts: the local backend can run
    it, no job still writes its run directory, and that holds the same spec (resume) or none. UsageError naming
    the first that fails."""
    from launcher.rundir import check_run_dir, refuse_live_writer

    from launcher.errors import UsageError

    for point in pipeline.points:
        try:
            backend_for("local").dryrun(point.spec)  # what the local backend refuses (more than one node)
        except UsageError as exc:
            raise UsageError(f"stage {_who(point)}: {exc}", hint=f"in {pipeline.path}, add distributed.nodes: 1 to "
                             f"the stage's set:, or submit its spec to a cluster") from None
        refuse_live_writer(point.spec, registry, backend_for)
        check_run_dir(point.spec)  # a finished point of a since changed spec is refused, not skipped


def headline(point: Point) -> str:
    """The point's main result from its summary: the selection metric (and test) of a finetune, the held-out
    loss of a pretrain."""
    summary = read_summary(point.run_dir) or {}
    spec = point.spec
    if spec.task is not None:
        metric = spec.task.best_metric
        parts = [f"{k.removeprefix('best_').replace('_', ' ', 1)} {number(v)}" for k, v in summary.items()
                 if k.startswith("best_") and k != "best_step" and isinstance(v, (int, float))]
        test = summary.get("test") or {}
        if isinstance(test.get(metric), (int, float)):
            parts.append(f"test {metric} {number(test[metric])}")
            base = (summary.get("test_baseline") or {}).get(metric)
            if isinstance(base, (int, float)):
                parts.append(f"trivial baseline {number(base)}")
        return ", ".join(parts)
    if summary.get("heldout_loss") is not None:
        return f"held-out loss {number(summary['heldout_loss'])}"
    return ""


def run_local(pipeline: Pipeline, registry, backend, echo: Callable[[str], None]) -> int:
    """Run the pipeline in the foreground. 0 when every stage completed, 1 when any failed (or was not run
    because one it needs failed), 130 on Ctrl-C."""
    outcome: dict[str, str] = {}  # stage -> "ok" | "failed" | "not run"
    started = time.monotonic()
    for stage in pipeline.stages:
        blocked = [d for d in stage.after if outcome.get(d) != "ok"]
        if blocked:
            outcome[stage.name] = "not run"
            why = ", ".join(f"{d} ({'failed' if outcome[d] == 'failed' else 'not run'})" for d in blocked)
            echo(f"{stage.name}: not run: it needs {why}")
            continue
        try:
            outcome[stage.name] = _run_stage(stage, pipeline.name, registry, backend, echo)
        except KeyboardInterrupt:
            echo("interrupted: the running jobs saved a checkpoint and stopped; submit the pipeline again to resume")
            return 130
    failed = [s for s, o in outcome.items() if o != "ok"]
    took = duration(time.monotonic() - started)
    if failed:
        echo(f"pipeline {pipeline.name}: FAILED after {took}: " + ", ".join(f"{s} {outcome[s]}" for s in failed))
        return 1
    echo(f"pipeline {pipeline.name}: COMPLETED in {took}; results: mbl results {pipeline.path}")
    return 0


def _run_stage(stage: Stage, pipeline: str, registry, backend, echo: Callable[[str], None]) -> str:
    pending: list[Point] = []
    for point in stage.points:
        if finished(point):
            echo(f"{_who(point)}: finished before, skipped ({headline(point)})")
        else:
            pending.append(point)
    running: dict[int, tuple[Point, object, float]] = {}  # index -> point, registry record, start time
    failed: list[Point] = []
    parallel = stage.parallel(local=True)
    last_progress = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                point = pending.pop(0)
                ref = backend.submit(backend.dryrun(point.spec))
                ref.extra.update(pipeline=pipeline, stage=stage.name, point=point.index)
                record = registry.add(ref, team=point.spec.team, kind=point.spec.kind, gpus=0)
                verb = "resuming" if (Path(point.run_dir) / "latest").exists() else "started"
                echo(f"{_who(point)}: {verb} as {point.name} (log: mbl logs {point.name}; run dir {point.run_dir})")
                running[point.index] = (point, record, time.monotonic())
            time.sleep(POLL_SECONDS)
            for index, (point, record, since) in list(running.items()):
                state = _state(backend, record.ref, since)
                if state is None:
                    continue
                del running[index]
                took = duration(time.monotonic() - since)
                if state.state == JobState.COMPLETED:
                    echo(f"{_who(point)}: COMPLETED in {took}" + (f" ({headline(point)})" if headline(point) else ""))
                else:
                    failed.append(point)
                    why = "; ".join(x for x in (state.reason, state.detail) if x)
                    echo(f"{_who(point)}: {state.state.value} after {took}" + (f" ({why})" if why else ""))
            if running and time.monotonic() - last_progress >= PROGRESS_EVERY:
                last_progress = time.monotonic()
                for point, _record, _since in running.values():
                    words = snapshot(point.run_dir).words()
                    if words["step"]:
                        echo(f"{_who(point)}: step {words['step']}" + (f", loss {words['loss']}" if words["loss"]
                                                                       else "") + (f", ETA {words['eta']}"
                                                                                   if words["eta"] else ""))
    except KeyboardInterrupt:
        for point, record, _since in running.values():
            backend.cancel(record.ref)
            registry.save_extra(record, record.ref.extra)
        for point, record, _since in running.values():
            backend.wait(record.ref, timeout=point.spec.checkpoint.save_grace_seconds + 30)
        raise
    if failed:
        echo(f"{stage.name}: FAILED: " + ", ".join(f"point {p.index} ({p.name})" if stage.swept else p.name
                                                  for p in failed))
        return "failed"
    return "ok"


def _who(point: Point) -> str:
    return f"{point.stage}[{point.index}] {point.label}" if point.label else point.stage


def _state(backend, ref: JobRef, since: float):
    """The job's final JobStatus, or None while it runs. A supervisor that just started may not show in /proc
    yet: gone without an exit code counts only after START_GRACE seconds."""
    status = backend.status(ref)
    if status.state in (JobState.RUNNING, JobState.PENDING):
        return None
    if not Path(ref.extra["rc"]).exists() and status.state == JobState.FAILED \
            and time.monotonic() - since < START_GRACE:
        return None
    return status
