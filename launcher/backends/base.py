"""The backend interface: a pure `dryrun(spec) -> Request`, and `submit(request)` that acts on it.

`mbl render` prints `backend.dryrun(spec)`; `mbl submit` runs `backend.submit(backend.dryrun(spec))`:
one code path, so what was rendered is what runs. Rendering never touches a subprocess, the network
or the clock; cluster facts come from the spec or a cluster profile.
"""

from __future__ import annotations

import abc
import shlex
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator

from launcher.errors import MblError
from launcher.spec import JobSpec


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


@dataclass
class Request:
    """What would run: a command line, plus the files it needs (a script, manifests, the spec).

    `files` maps a name relative to the output directory (or run directory) to its content.
    `str(request)` shows the command, then each file.
    """

    backend: str
    spec: JobSpec
    command: list[str]
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(self.command)
        line = f"{env} {cmd}" if env else cmd
        return f"cd {shlex.quote(self.cwd)} && {line}" if self.cwd else line

    def __str__(self) -> str:
        parts = [f"# {self.backend}: {self.command_line()}"]
        for name, content in self.files.items():
            parts.append(f"# ---- {name} ----\n{content.rstrip()}")
        return "\n".join(parts) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        """Write the rendered files under `out_dir` (used by `mbl render -o DIR`)."""
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, content in self.files.items():
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            written.append(path)
        return written


@dataclass
class JobRef:
    """A submitted job. `extra` holds what the backend needs to find it again (kept in the registry)."""

    backend: str
    job_id: str
    name: str
    run_dir: str
    extra: dict = field(default_factory=dict)


@dataclass
class JobStatus:
    state: JobState
    reason: str = ""
    detail: str = ""


class Backend(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def dryrun(self, spec: JobSpec) -> Request:
        """Pure: the request that `submit` would act on."""

    @abc.abstractmethod
    def submit(self, request: Request) -> JobRef:
        """Start the job described by `request`."""

    @abc.abstractmethod
    def status(self, ref: JobRef) -> JobStatus: ...

    def statuses(self, refs: list[JobRef]) -> list[JobStatus]:
        """The states of many jobs (`mbl list`), in the order of `refs`. A backend that can ask its cluster about
        all of them at once (Slurm: one squeue, one sacct) overrides this one-by-one default. A job the cluster
        could not be asked about is UNKNOWN, with why."""
        out = []
        for ref in refs:
            try:
                out.append(self.status(ref))
            except MblError as exc:
                out.append(JobStatus(JobState.UNKNOWN, str(exc)))
        return out

    @abc.abstractmethod
    def logs(self, ref: JobRef, follow: bool = False, rank: int | None = None) -> Iterator[str]: ...

    @abc.abstractmethod
    def cancel(self, ref: JobRef) -> bool:
        """Ask the job to stop; False if it had already finished. May update `ref.extra`."""
