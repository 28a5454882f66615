"""A pipeline on Kubernetes: one PyTorchJob (and its spec ConfigMap) per stage and sweep point, all created at
once; a stage's pods wait for their upstream stages in an init container.

Each point is the ordinary job of `mbl submit --k8s` (launcher/backends/k8s_render.py), queued under Kueue
when the spec names a queue. A point of a stage with `after:` gets an init container, `wait-for-upstream`,
that runs `python -m launcher.stagewait` (same image, the shared volume) until every upstream point's run
directory holds DONE: no workflow engine and nothing on this machine, so the pipeline survives the launcher
going away. It gives up with a clear termination message when an upstream point failed for good, or after
`wait_timeout` (the upstream stages' time limits and retries, plus WAIT_SLACK for queueing); the job's
`activeDeadlineSeconds`, which counts the wait, grows by as much. The job's own retries do not restart a
failed wait.

`submit` creates every point's job in dependency order and registers it (`mbl status/list/logs/cancel` by
the point's name); submitting again keeps the jobs that still exist with the same spec and creates the rest.
A sweep's max_parallel is not enforced here (Kueue's quota is the throttle on Kubernetes).
TrainJob (`k8s.api: trainjob`) pipelines are not supported yet: its runtime owns the pod template.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml

from launcher.backends.base import Request
from launcher.errors import BackendError, UsageError
from launcher.pipeline import Pipeline, Point, Stage

INIT_CONTAINER = "wait-for-upstream"
WAIT_SLACK = 3600  # seconds of queueing allowed on top of the upstream stages' own time limits
POLL_SECONDS = 10


def wait_timeout(pipeline: Pipeline, stage: Stage) -> int:
    """How long a stage's pods wait for its upstream stages: each upstream chain's time limits times its
    attempts (the longest chain), plus WAIT_SLACK."""
    memo: dict[str, int] = {}

    def chain(name: str) -> int:
        if name not in memo:
            s = pipeline.stage(name)
            spec = s.points[0].spec
            own = spec.resources.time_limit_seconds * (1 + spec.k8s.max_restarts)
            memo[name] = own + max((chain(a) for a in s.after), default=0)
        return memo[name]

    return max((chain(a) for a in stage.after), default=0) + WAIT_SLACK


def wait_container(pipeline: Pipeline, stage: Stage, template: dict[str, Any], timeout: int) -> dict[str, Any]:
    """The init container: the trainer's image, security context and shared volume; stdlib Python only."""
    trainer = template["spec"]["containers"][0]
    upstream = [f"{p.stage}={p.run_dir}" if len(pipeline.stage(p.stage).points) == 1 else
                f"{p.stage}[{p.index}]={p.run_dir}" for a in stage.after for p in pipeline.stage(a).points]
    return {
        "name": INIT_CONTAINER,
        "image": trainer["image"],
        "imagePullPolicy": trainer.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python", "-m", "launcher.stagewait", f"--timeout={timeout}", f"--poll={POLL_SECONDS}",
                    *upstream],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": trainer["securityContext"],
        "volumeMounts": [m for m in trainer["volumeMounts"] if m["name"] == "shared"],
    }


def point_request(pipeline: Pipeline, stage: Stage, point: Point, backend: Any) -> Request:
    """The point's ordinary request (`backend.dryrun`), with the wait for its upstream stages added."""
    if point.spec.k8s.api != "pytorchjob":
        raise UsageError(f"stage {stage.name}: a pipeline on Kubernetes runs PyTorchJobs for now, and the spec "
                         f"says k8s.api: {point.spec.k8s.api}",
                         hint=f"add k8s.api: pytorchjob to the stage's set: in {pipeline.path}")
    request = backend.dryrun(point.spec)
    if not stage.after:
        return request
    from launcher.backends import k8s_render as render
    from launcher.backends.k8s import MANIFESTS

    cm, job = [d for d in yaml.safe_load_all(request.files[MANIFESTS]) if d is not None]
    timeout = wait_timeout(pipeline, stage)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        template = replica["template"]
        template["spec"]["initContainers"] = [wait_container(pipeline, stage, template, timeout)]
    job["spec"]["runPolicy"]["activeDeadlineSeconds"] += timeout
    header = request.files[MANIFESTS].splitlines()[0].lstrip("# ") + f", after {', '.join(stage.after)}"
    files = {MANIFESTS: render.to_yaml([cm, job], header)}
    return Request(request.backend, request.spec, request.command, files=files)


def plan(pipeline: Pipeline, backend: Any) -> list[tuple[Point, Request]]:
    """Every point's request, in dependency order. Pure."""
    return [(p, point_request(pipeline, s, p, backend)) for s in pipeline.stages for p in s.points]


def render(pipeline: Pipeline, backend: Any) -> str:
    """What `mbl render --k8s PIPELINE` prints: every object of every point, one multi-document YAML."""
    return "".join(r.files["manifests.yaml"] for _p, r in plan(pipeline, backend))


def submit(pipeline: Pipeline, backend: Any, registry: Any, echo: Callable[[str], None]) -> int:
    """Create every point's ConfigMap and PyTorchJob, upstream stages first; 0. A job that already exists with
    this spec is kept (a re-submission); any other refusal stops here, naming what was created."""
    created: list[str] = []
    kept: list[str] = []
    for point, request in plan(pipeline, backend):
        try:
            ref = backend.submit(request)
        except BackendError as exc:
            if "already exists in namespace" in str(exc) and "a different job" not in str(exc):
                kept.append(point.name)
                echo(f"{point.stage}[{point.index}] {point.name}: {exc}; kept")
                continue
            if created:
                echo(f"created before the refusal (they stay, waiting): {', '.join(created)}")
            raise
        ref.extra.update(pipeline=pipeline.name, stage=point.stage, point=point.index)
        registry.add(ref, team=point.spec.team, kind=point.spec.kind, gpus=point.spec.total_gpus)
        created.append(point.name)
        stage = pipeline.stage(point.stage)
        waits = f", waits for {', '.join(stage.after)}" if stage.after else ""
        echo(f"{point.stage}[{point.index}] {point.name}: created PyTorchJob {ref.job_id}{waits}")
    echo(f"pipeline {pipeline.name}: {len(created)} job(s) created, {len(kept)} kept; mbl list shows them")
    return 0
