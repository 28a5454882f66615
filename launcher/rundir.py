"""The run directory guard: one spec per run directory; the same spec again means resume."""

from __future__ import annotations

from pathlib import Path

import yaml

from launcher.contract import SPEC_FILE
from launcher.errors import UsageError
from launcher.spec import JobSpec


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
