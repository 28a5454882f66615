"""One writer per run directory: the trainer's lease, safe on shared file systems where `flock` may not work.

    <run_dir>/lease/gen-00000007.json    {"job", "attempt", "host", "pid", "user", "acquired", "heartbeat"}

A lease is a generation file; the highest generation is the lease. Taking it means creating the next
generation with `os.link` of a fully written temporary file: link is atomic and fails when the name exists
(also on NFS), so of two trainers that try at once exactly one gets it, and a reader never sees a half-written
lease. The holder (rank 0) rewrites its own generation every `ttl / 4` seconds (tmp file + `os.replace`) with
a new heartbeat time. The lease can be taken

- when there is none (the previous holder released it on exit),
- at once by a later attempt of the same job (a Slurm requeue, a restarted pod: MBL_JOB_ID is the same),
- by anyone once its heartbeat is older than the ttl (the holder was SIGKILLed, its node died), and at once
  when the holder ran on this host and its process is gone.

Otherwise the trainer stops at once with LeaseError, naming the job that holds it, before it writes anything.
A holder whose generation is no longer the highest (it stalled for longer than the ttl and was taken over)
has lost the lease: its heartbeat thread sees it, and `check()`, called before a checkpoint is committed,
raises, so that a stale writer never moves `latest`.

MBL_LEASE_TTL (seconds, default 60) sets the ttl; tests shorten it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from jobs.errors import DataError
from launcher import contract
from launcher.rundir import LEASE_GEN, current_lease, describe_holder, holder_gone, lease_ttl


class LeaseError(DataError):
    """Another job writes this run directory."""


def _owner() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"job": os.environ.get("MBL_JOB_ID") or f"{socket.gethostname()}-{os.getppid()}",
            "attempt": int(os.environ.get("MBL_ATTEMPT", "0") or 0), "host": socket.gethostname(),
            "pid": os.getpid(), "user": user}


class Lease:
    """The lease of one run directory, held by rank 0 of a job."""

    def __init__(self, run_dir: Path, log=print):
        self.dir = Path(run_dir) / contract.LEASE_DIR
        self.ttl = lease_ttl()
        self.log = log
        self.owner = _owner()
        self.gen: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.dir / f"gen-{self.gen:08d}.json"

    def _write(self, path: Path, data: dict, link: bool) -> bool:
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if link:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
                tmp = None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> str:
        """Take the lease or raise LeaseError. Returns what was taken over ("" when the lease was free)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # another trainer took the next generation first: look again
            now = time.time()
            held = current_lease(self.dir.parent)
            took = ""
            if held is not None:
                gen, holder = held
                age = now - float(holder.get("heartbeat", 0))
                if holder.get("job") == self.owner["job"]:
                    took = f"took over the lease of attempt {holder.get('attempt')} of this job"
                elif age > self.ttl or holder_gone(holder):
                    took = f"took over a stale lease: {describe_holder(holder, now)}"
                else:
                    raise LeaseError(
                        f"run directory {self.dir.parent} is being written by {describe_holder(holder, now)}",
                        f"wait for that job to end (mbl logs -f / mbl status), stop it (mbl cancel), or use another "
                        f"checkpoint.dir; a lease whose holder died is taken over after {self.ttl:.0f}s without "
                        "a heartbeat")
            else:
                gen = 0
            data = {**self.owner, "acquired": now, "heartbeat": now}
            self.gen = gen + 1
            if self._write(self.path, data, link=True):
                for old in self.dir.glob("gen-*.json"):  # earlier generations: nobody reads them again
                    m = LEASE_GEN.fullmatch(old.name)
                    if m and int(m.group(1)) < self.gen:
                        old.unlink(missing_ok=True)
                self._data = data
                self._start()
                return took
        raise LeaseError(f"could not take the lease of {self.dir.parent}: other trainers keep taking it",
                         "make sure only one job uses this checkpoint.dir")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="mbl-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if self._still_mine():
                try:
                    self._write(self.path, {**self._data, "heartbeat": time.time()}, link=False)
                except OSError as exc:
                    self.log(f"warning: lease heartbeat failed: {exc}")

    def _still_mine(self) -> bool:
        held = current_lease(self.dir.parent)
        if held is not None and held[0] == self.gen:
            return True
        if self.lost is None:
            self.lost = (f"lost the lease of {self.dir.parent}: " +
                         (f"now held by {describe_holder(held[1])}" if held else "its file was removed"))
            self.log(f"error: {self.lost}; this job must not write there any more")
        return False

    def check(self) -> None:
        """Raise LeaseError when the lease is no longer this job's (call before committing a checkpoint)."""
        if self.gen is not None and not self._still_mine():
            raise LeaseError(self.lost or "lost the lease", "another job writes this run directory now; "
                             "this one stops without saving")

    def release(self) -> None:
        """Stop the heartbeat and remove this generation, if it is still the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = current_lease(self.dir.parent)
        if self.gen is not None and held is not None and held[0] == self.gen:
            self.path.unlink(missing_ok=True)
        self.gen = None
