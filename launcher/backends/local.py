"""The local backend: torchrun on this machine, `gpus_per_node` processes (gloo when there is no GPU).

The default a new user tries first. The job runs under a small supervisor (`launcher.localrun`) that
leads its own process group, appends the output to `<run_dir>/logs/local-<n>.log` and records the exit
code beside it, so that `mbl status`, `mbl logs` and `mbl cancel` work after `--detach` as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from launcher.backends.base import Backend, JobRef, JobState, JobStatus, Request
from launcher.contract import DONE_FILE, LAUNCH_REQUEUE, LOGS_DIR, SPEC_FILE
from launcher.errors import BackendError, UsageError
from launcher.spec import JobSpec
from launcher.outcomes import last_outcome
from launcher.torchrun import launch_command


class LocalBackend(Backend):
    name = "local"

    def __init__(self, detach: bool = False, force: bool = False, echo: bool = True):
        self.detach = detach
        self.force = force
        self.echo = echo

    # ---- pure ---------------------------------------------------------------------------------

    def dryrun(self, spec: JobSpec) -> Request:
        if spec.distributed.nodes != 1:
            raise UsageError(
                f"the local backend runs one node, the spec asks for distributed.nodes={spec.distributed.nodes}",
                hint="add --set distributed.nodes=1, or submit with --cluster slurm / --k8s",
            )
        env = {"MBL_JOB_NAME": spec.name, "MBL_RUN_DIR": spec.run_dir, "MBL_BACKEND": self.name, **spec.env}
        command = launch_command(spec, f"{spec.run_dir}/{SPEC_FILE}", ["--standalone", "--nnodes=1"])
        return Request(self.name, spec, command, files={SPEC_FILE: spec.to_yaml()}, env=env)

    # ---- acting -------------------------------------------------------------------------------

    def submit(self, request: Request) -> JobRef:
        from launcher.rundir import check_run_dir, write_spec

        spec = request.spec
        check_run_dir(spec, force=self.force)
        write_spec(spec)
        logs = Path(spec.run_dir) / LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        attempt = len(list(logs.glob("local-*.log")))
        log, rc = logs / f"local-{attempt}.log", logs / f"local-{attempt}.rc"
        env = dict(os.environ)
        env.update(request.env)
        env.update(self._secret_env(spec))
        env["MBL_ATTEMPT"] = str(attempt)
        # The torchrun of this Python environment, whatever PATH says.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        # The job imports `jobs` and `launcher` from wherever this launcher runs from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        supervisor = [sys.executable, "-m", "launcher.localrun", "--log", str(log), "--rc", str(rc), "--"]
        try:
            proc = subprocess.Popen(
                supervisor + request.command, env=env, cwd=request.cwd, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise BackendError(f"could not start the local job: {exc}") from None
        extra = {"pid": proc.pid, "log": str(log), "rc": str(rc)}
        return JobRef(self.name, f"local-{proc.pid}", spec.name, spec.run_dir, extra)

    @staticmethod
    def _secret_env(spec: JobSpec) -> dict[str, str]:
        env = {}
        for name, ref in spec.secrets.items():
            if ref.file:
                path = Path(os.path.expanduser(ref.file))
                try:
                    env[name] = path.read_text().strip()
                except OSError as exc:
                    raise UsageError(
                        f"secrets.{name}.file: cannot read {path}: {exc.strerror}",
                        hint="create the file (mode 600) or remove the secret",
                    ) from None
        return env

    # ---- following ----------------------------------------------------------------------------

    @staticmethod
    def _paths(ref: JobRef) -> tuple[int, Path, Path]:
        return int(ref.extra["pid"]), Path(ref.extra["log"]), Path(ref.extra["rc"])

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"launcher.localrun" in cmdline

    def status(self, ref: JobRef) -> JobStatus:
        pid, _log, rc_path = self._paths(ref)
        if rc_path.exists():
            rc = int(rc_path.read_text().strip() or "1")
            if ref.extra.get("cancelled"):
                return JobStatus(JobState.CANCELLED, detail=f"exit code {rc}")
            if rc == 0:
                return JobStatus(JobState.COMPLETED)
            outcome = last_outcome(ref.run_dir)
            if rc == LAUNCH_REQUEUE:
                return JobStatus(JobState.PREEMPTED, reason=outcome or "stopped to be requeued",
                                 detail="submit the same spec again to resume")
            return JobStatus(JobState.FAILED, reason=outcome, detail=f"exit code {rc}; see `mbl logs {ref.name}`")
        if self._alive(pid):
            return JobStatus(JobState.RUNNING, detail=f"pid {pid}")
        if (Path(ref.run_dir) / DONE_FILE).exists():
            return JobStatus(JobState.COMPLETED)
        return JobStatus(JobState.FAILED, reason="the job's supervisor is gone without an exit code")

    def logs(self, ref: JobRef, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        pid, log, rc = self._paths(ref)
        if not log.exists():
            raise BackendError(f"no log yet at {log}")
        with open(log, errors="replace") as fh:
            while True:
                line = fh.readline()
                if line:
                    yield line
                    continue
                if not follow or rc.exists() or not self._alive(pid):
                    rest = fh.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.2)

    def cancel(self, ref: JobRef) -> bool:
        """SIGTERM to the whole process group: every rank saves at its next step and exits."""
        pid, _log, _rc = self._paths(ref)
        if not self._alive(pid):
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        ref.extra["cancelled"] = True
        return True

    def wait(self, ref: JobRef, timeout: float | None = None) -> int | None:
        """The job's exit code once it ends; None on timeout or if it vanished without one."""
        pid, _log, rc = self._paths(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not rc.exists():
            if not self._alive(pid):
                time.sleep(0.3)
                break
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        return int(rc.read_text().strip()) if rc.exists() else None
