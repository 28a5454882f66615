"""The run directory guard: one spec per run directory (the same spec again means resume), and one writer.

One writer has two halves. Here, before a submission: a job of the registry (any name) on the same run
directory that has not finished, the newest Slurm job that wrote into it (`logs/job-<id>.sbatch`, so also
another user's, whose registry is separate), or a live lease in it refuse the submission. Inside the job,
rank 0 takes the lease (jobs/lease.py), whose file format is read here too: the launcher never imports the
trainer.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from launcher.contract import LEASE_DIR, LOGS_DIR, SPEC_FILE
from launcher.errors import UsageError
from launcher.spec import JobSpec

LEASE_GEN = re.compile(r"gen-(\d{8})\.json")
DEFAULT_LEASE_TTL = 60.0


def lease_ttl() -> float:
    """Seconds without a heartbeat after which a lease counts as abandoned (MBL_LEASE_TTL, default 60)."""
    return float(os.environ.get("MBL_LEASE_TTL", DEFAULT_LEASE_TTL))


def current_lease(run_dir: str | Path) -> tuple[int, dict] | None:
    """The lease's highest generation and its content; None when nobody holds it."""
    folder = Path(run_dir) / LEASE_DIR
    try:
        gens = sorted(int(m.group(1)) for p in folder.iterdir() if (m := LEASE_GEN.fullmatch(p.name)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for gen in reversed(gens):
        try:
            return gen, json.loads((folder / f"gen-{gen:08d}.json").read_text())
        except (OSError, ValueError):  # released between listing and reading: look at the one before
            continue
    return None


def holder_gone(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (SIGKILLed): no need to wait for the ttl."""
    import socket

    if holder.get("host") != socket.gethostname() or not str(holder.get("pid", "")).isdigit():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def lease_is_live(holder: dict, now: float | None = None) -> bool:
    """A heartbeat within the ttl from a process that may still be alive."""
    return (now or time.time()) - float(holder.get("heartbeat", 0)) <= lease_ttl() and not holder_gone(holder)


def describe_holder(holder: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(holder.get("heartbeat", 0))
    return (f"job {holder.get('job')} (attempt {holder.get('attempt')}, user {holder.get('user')}, "
            f"host {holder.get('host')}, pid {holder.get('pid')}; last heartbeat {age:.0f}s ago)")


def refuse_live_writer(spec: JobSpec, registry: Any, backend_for: Callable[[str], Any]) -> None:
    """UsageError when a job that may still write `spec.run_dir` is pending or running.

    `backend_for(name)` gives the backend of a registry record, to ask it the job's state."""
    from launcher.backends.base import JobRef, JobState
    from launcher.errors import MblError

    def live(backend: str, ref: Any) -> JobState | None:
        """The job's state when it may still write (a local job that saved and stopped is over)."""
        try:
            state = backend_for(backend).status(ref).state
        except MblError:  # its cluster does not answer: nothing to say about it
            return None
        alive = {JobState.PENDING, JobState.RUNNING, JobState.REQUEUED}
        return state if state in alive or (state == JobState.PREEMPTED and backend != "local") else None

    run_dir = str(Path(spec.run_dir))
    hint = "follow it with `mbl logs -f {name}`, stop it with `mbl cancel {name}`, or use another checkpoint.dir"
    seen = set()
    for record in registry.list():
        if str(Path(record.run_dir)) != run_dir or record.extra.get("ended_at"):
            continue
        state = live(record.backend, record.ref)
        seen.add((record.backend, record.job_id))
        if state is not None:
            raise UsageError(f"run directory {run_dir} has a job that is still {state.value}: {record.name} "
                             f"({record.backend} job {record.job_id})", hint.format(name=record.name))
    scripts = sorted(Path(run_dir, LOGS_DIR).glob("job-*.sbatch"), key=lambda p: p.stat().st_mtime)
    if scripts:  # the newest Slurm submission into this run dir, whoever made it
        job_id = scripts[-1].name[len("job-"):-len(".sbatch")]
        if ("slurm", job_id) not in seen:
            state = live("slurm", JobRef("slurm", job_id, spec.name, run_dir))
            if state is not None:
                raise UsageError(f"run directory {run_dir} has Slurm job {job_id} that is still {state.value} "
                                 "(submitted from another registry or user)",
                                 f"wait for it (squeue -j {job_id}), cancel it (scancel {job_id}), or use another "
                                 "checkpoint.dir")
    held = current_lease(run_dir)
    if held is not None:
        holder = held[1]
        if lease_is_live(holder):
            raise UsageError(f"run directory {run_dir} is being written by {describe_holder(holder)}",
                             "wait for that job to end, stop it, or use another checkpoint.dir")


def _flat(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def check_run_dir(spec: JobSpec, force: bool = False) -> str:
    """'new' or 'resume'; raises if the run directory holds a different job.

    `force` allows starting a different spec into it (the user asked for it); checkpoints of the old spec
    then stop the trainer, which refuses a changed fingerprint, so `force` is for renamed jobs and edits
    that keep the fingerprint.
    """
    path = Path(spec.run_dir) / SPEC_FILE
    if not path.exists():
        return "new"
    try:
        old = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    except Exception as exc:  # an unreadable old spec is never silently replaced
        if force:
            return "new"
        raise UsageError(
            f"run directory {spec.run_dir} holds a spec that no longer validates ({exc.__class__.__name__})",
            hint="choose another checkpoint.dir or job name, or pass --force to replace it",
        ) from None
    if old.training_fingerprint() == spec.training_fingerprint() or force:
        return "resume"
    before, after = _flat(old.model_dump(mode="json")), _flat(spec.model_dump(mode="json"))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    raise UsageError(
        f"run directory {spec.run_dir} already holds a different job (changed: {', '.join(changed[:8])})",
        hint="give the job another name or checkpoint.dir; or revert the change to resume that run",
    )


def write_spec(spec: JobSpec) -> Path:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SPEC_FILE
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(spec.to_yaml())
    tmp.replace(path)
    return path
