"""The paths a job reads or writes, and whether its container sees them: one rule for every backend.

A spec names files and folders: `data.train`, `data.validation` and `data.test` entries (files, glob
patterns or local `datasets` folders, all opened as paths by jobs/data.py), `data.prepared`,
`data.tokenizer`, `model.init_from` and `checkpoint.dir`. The trainer opens them as written, in the
directory it starts in. What it can see depends on where it runs:

- local: this machine, in the directory `mbl` ran in. Any path works; relative ones too.
- Slurm without a container (`container_runtime: none`): the compute nodes, in the submit directory
  (sbatch's default), so relative paths mean there what they mean here. No further rule.
- Slurm with a container runtime: the image, plus the profile's `shared_root` (and the destinations of
  `slurm.container_mounts`) mounted at the same path. A relative path is resolved against the submit
  directory (`resolve_paths`, called when the CLI loads a spec, as `JobSpec.resolved` does for
  checkpoint.dir) and must then lie under one of those mounts.
- Kubernetes: the image, plus the PVC mounted at `k8s.mount_path`. The submitter's directory does not
  exist in a pod: a relative path is refused, and an absolute one must lie under the mount path. (The CLI
  resolves relative paths for every backend, so from `mbl` such a path arrives absolute, in the submit
  directory, and is refused for lying outside the mount path.)

The local backend needs no rule. Resolving there changes nothing either: the job starts in the submit
directory.

A glob pattern is checked by its directory part (`/shared/data/*.txt` by `/shared/data`). The checks are
lexical: no file system access (rendering stays pure, and the paths are the container's, not this
machine's), `..` is folded before comparing, so `/shared/../etc` is not under `/shared`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from launcher.errors import UsageError

# A JobSpec is passed in as `spec: Any`: launcher.spec imports this module (JobSpec.resolved), and this one
# needs only its attributes, so it does not import launcher.spec (no import cycle).
JobSpec = Any

GLOB_CHARS = "*?["  # what jobs/data.py hands to glob.glob
LIST_FIELDS = ("train", "validation", "test")  # data.<field>: lists of inputs


@dataclass(frozen=True)
class JobPath:
    """One path of a spec: the field it is in (`data.train[0]`) and its value as written."""

    field: str
    value: str

    @property
    def is_glob(self) -> bool:
        return any(c in self.value for c in GLOB_CHARS)

    @property
    def checked(self) -> str:
        """The part the rules look at: the directory part of a glob pattern, else the path itself."""
        if not self.is_glob:
            return self.value
        kept: list[str] = []
        for part in PurePosixPath(self.value).parts:
            if any(c in part for c in GLOB_CHARS):
                break
            kept.append(part)
        return str(PurePosixPath(*kept)) if kept else "."

    @property
    def is_absolute(self) -> bool:
        return PurePosixPath(self.value).is_absolute()

    def described(self) -> str:
        text = f"{self.field} is {self.value!r}"
        if self.is_glob:
            text += f" (a pattern, checked by its directory {self.checked!r})"
        return text


def job_paths(spec: JobSpec) -> list[JobPath]:
    """Every path the job reads or writes, in spec order, checkpoint.dir last (with {name} filled in)."""
    found: list[JobPath] = []
    for name in LIST_FIELDS:
        found += [JobPath(f"data.{name}[{i}]", v) for i, v in enumerate(getattr(spec.data, name))]
    for field, value in (("data.prepared", spec.data.prepared), ("data.tokenizer", spec.data.tokenizer),
                         ("model.init_from", spec.model.init_from)):
        if value:
            found.append(JobPath(field, value))
    found.append(JobPath("checkpoint.dir", spec.run_dir))
    return found


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or inside it, lexically (`..` folded first). Both absolute POSIX paths."""
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def absolute(value: str, base: str | Path) -> str:
    """`value` joined to `base` (an absolute `value` wins), `..` and `.` folded; glob characters kept."""
    return posixpath.normpath(posixpath.join(str(base), value))


def resolve_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A spec's data (`JobSpec.model_dump(mode="json")`) with every relative data/model path made absolute
    against `base`, the submit directory; absolute paths stay as written. checkpoint.dir is left to
    `JobSpec.resolved`."""

    def resolved(value: str) -> str:
        return value if PurePosixPath(value).is_absolute() else absolute(value, base)

    out = {**data, "data": dict(data.get("data") or {}), "model": dict(data.get("model") or {})}
    for name in LIST_FIELDS:
        out["data"][name] = [resolved(v) for v in out["data"].get(name) or []]
    for section, name in (("data", "prepared"), ("data", "tokenizer"), ("model", "init_from")):
        if out[section].get(name):
            out[section][name] = resolved(out[section][name])
    return out


# ---- the rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    message: str  # the field, its value, why the container cannot see it
    fix: str  # what to do about this one
    general: str  # the same, for a list of several problems


def _raise(problems: list[_Problem], where: str) -> None:
    """One problem: its message and fix. Several: each on a line, then the fixes they need (once each)."""
    if not problems:
        return
    if len(problems) == 1:
        raise UsageError(problems[0].message, hint=problems[0].fix)
    lines = "\n".join(f"  {p.message}" for p in problems)
    fixes = "; ".join(dict.fromkeys(p.general for p in problems))
    raise UsageError(f"{len(problems)} paths of the spec are not visible {where}:\n{lines}", hint=fixes)


def mount_destinations(mounts: list[str]) -> list[str]:
    """The container side of `SRC[:DST[:FLAGS]]` mounts (pyxis and apptainer syntax), absolute ones only."""
    out = []
    for mount in mounts:
        parts = mount.split(":")
        dst = parts[1] if len(parts) > 1 and parts[1] else parts[0]
        if dst.startswith("/"):
            out.append(dst)
    return out


def check_slurm(spec: JobSpec, shared_root: str, runtime: str, base: str | Path | None = None) -> None:
    """Slurm with a container runtime (`runtime`, not `none`): every path, a relative one resolved against
    `base` (the submit directory; default the CWD), lies under `shared_root` or a destination of
    `slurm.container_mounts`. Raises UsageError (exit 2) naming the field, the value and the fix."""
    if runtime == "none":
        return
    submit_dir = str(base or Path.cwd())
    roots = [shared_root, *mount_destinations(spec.slurm.container_mounts)]
    problems: list[_Problem] = []
    for path in job_paths(spec):
        if any(is_under(absolute(path.checked, submit_dir), root) for root in roots):
            continue
        if path.field == "checkpoint.dir":
            fix = f"set checkpoint.dir under {shared_root} (e.g. {shared_root}/runs/{{name}}), or shared_root in the " \
                  "cluster profile"
            problems.append(_Problem(
                f"the run directory {spec.run_dir} is not under the shared storage {shared_root} mounted into the "
                f"{runtime} container", fix, fix))
            continue
        what = path.described()
        if not path.is_absolute:
            what += f", which resolves against the submit directory {submit_dir} to {absolute(path.value, submit_dir)!r}"
        field = path.field.split("[")[0]
        problems.append(_Problem(
            f"{what}: not under the shared storage {' or '.join(roots)} mounted into the {runtime} container",
            f"put it under {shared_root} and write that path in {field} (or submit from a directory under "
            f"{shared_root}), mount its directory with slurm.container_mounts, or set shared_root in the cluster "
            "profile",
            f"put the data under {shared_root} and write those paths (or submit from a directory under "
            f"{shared_root}), mount their directories with slurm.container_mounts, or set shared_root in the "
            "cluster profile",
        ))
    _raise(problems, f"in the {runtime} container")


def check_k8s(spec: JobSpec) -> None:
    """Kubernetes: every path is absolute and under `k8s.mount_path`, where the PVC `k8s.pvc` is mounted.
    Raises UsageError (exit 2) naming the field, the value and the fix."""
    mount, pvc = posixpath.normpath(spec.k8s.mount_path), spec.k8s.pvc
    general = (f"copy the data onto the PVC {pvc} and write each path as the pod sees it, an absolute path under "
               f"{mount} (or set k8s.mount_path)")
    problems: list[_Problem] = []
    for path in job_paths(spec):
        if path.field == "checkpoint.dir":
            if not path.is_absolute or not is_under(path.value, mount):
                fix = f"set checkpoint.dir: {mount}/runs/{{name}} (a path as the container sees it)"
                problems.append(_Problem(
                    f"checkpoint.dir resolves to {spec.run_dir}, which is not on the shared volume mounted at {mount}",
                    fix, fix))
            continue
        field = path.field.split("[")[0]
        if not path.is_absolute:
            example = posixpath.join(mount, posixpath.normpath(path.value).lstrip("./") or "data")
            problems.append(_Problem(
                f"{path.described()}: a relative path, and a pod has no submit directory to resolve it against "
                "(it starts in the image's working directory)",
                f"copy it onto the PVC {pvc} and write {field} as the pod sees it, an absolute path under {mount} "
                f"(e.g. {example})",
                general,
            ))
        elif not is_under(path.checked, mount):
            problems.append(_Problem(
                f"{path.described()}: not on the shared volume mounted at {mount}; a pod sees only its image and "
                "that volume",
                f"copy it onto the PVC {pvc} and write {field} as the pod sees it, under {mount}, or set "
                "k8s.mount_path",
                general,
            ))
    _raise(problems, "in the pod")
