"""Atomic checkpoints on shared storage, `latest`, retention, resume, and preemption signals.

    checkpoints/step-00000200/
        <DeepSpeed's files of every rank>   engine.save_checkpoint (model, optimizer, scheduler)
        trainer_state.json                  step, tokens, best metric, spec fingerprint, world size
        rank-00000.pt ...                   per rank: data position and RNG states (python, numpy, torch)
        manifest.json                       every file's size and sha256
        COMPLETE                            written last; a folder without it never counts

A save is collective. Every rank writes its files into `checkpoints/.tmp-step-N`, hashing and fsyncing each
one as it goes (DeepSpeed's writes are routed through the same writer), and reports sizes and digests to
rank 0. Rank 0 writes the manifest and the marker, renames the folder to `step-N`, replaces `latest`
(tmp file + os.replace) and only then deletes older checkpoints (keep_last newest plus the best one).

A save in the background (checkpoint.async_save, the periodic saves) blocks training only while the state
is copied to host memory (jobs/snapshot.py: DeepSpeed's state dicts as its checkpoint engine receives them,
this rank's data position and RNG states, the trainer state): then a thread of each rank writes, hashes and
fsyncs those files at a lower CPU priority than training's, the ranks agree on a process group of their own
(gloo) and rank 0 commits exactly as above, while training goes on. So `latest` moves only once every file
of every rank is durable; a kill at any point of the background write leaves the previous checkpoint
`latest`. One save is in flight at most: a new save first waits for the one being written. At every step
boundary `poll()` (one small all_reduce, only while a write is in flight) lets the ranks see together that
their writes are over, and a save that failed raises there; `wait()` does the same at once, blocking:
before a preemption save (which blocks until durable, as the saves with async_save false do) and at the end
of the run. The files are the same, byte for byte, as a blocking save writes.

A failed write on any rank (ENOSPC, EDQUOT, ...) is seen by every rank at the next agreement point: the
temporary folder is removed, the previous checkpoint stays intact and `latest`, and every rank raises
CheckpointError, which the trainer prints as one message with the fix (exit code 1). For a save in the
background that agreement point is the step boundary where the ranks see its write end, or the next save.

Fault injection, for tests: MBL_FAULT_AT=<point>[@<step>] makes rank MBL_FAULT_RANK (default 0) SIGKILL
itself at that point of the save sequence (MBL_FAULT_KILL=group: its whole process group, i.e. the whole
job when the ranks were started in one group). The points, in order, are FAULT_POINTS below.
MBL_FAULT_SAVE_DELAY=<seconds>[@<step>] makes rank MBL_FAULT_RANK sleep that long inside a save (of every
step, or of that step only), once the temporary folder exists and before DeepSpeed writes; it prints a line
saying so. A slow save on a slow file system, to show that the ranks get their save window after a stop
signal before anyone kills them. The other ranks wait for it in the save's next collective.
MBL_FAULT_WRITE_DELAY=<seconds>[@<step>] does the same inside a background write, before its first file: a
slow background write while training goes on (the fault points from deepspeed-file on are in that thread).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jobs.data import file_sha256
from jobs.errors import ResumeError
from jobs.snapshot import HostPool, Snapshot
from launcher import contract
from launcher.errors import MblError

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"  # a save in progress (or killed): never counts
DEL_PREFIX = ".del-"  # a checkpoint being deleted: moved out of the step-* names first, so it never counts

FAULT_POINTS = {
    "begin": "temporary folder ready, nothing written",
    "deepspeed-file": "the first of this rank's DeepSpeed files written, the others not",
    "deepspeed": "this rank's DeepSpeed files written (every rank's, in a blocking save)",
    "rank-state": "this rank's data position and RNG states written",
    "trainer-state": "trainer_state.json written (rank 0), other ranks may still be writing",
    "gathered": "every rank's files written and fsynced, sizes and digests on rank 0; no manifest",
    "manifest": "manifest.json written and fsynced, no COMPLETE marker",
    "marker": "COMPLETE written inside the temporary folder, not renamed yet",
    "renamed": "folder renamed to step-N, `latest` still names the previous checkpoint",
    "latest": "the new `latest` written to latest.tmp, os.replace not done",
    "retention": "an old checkpoint moved to .del-step-N, not removed yet",
}


class CheckpointError(MblError):
    """A checkpoint could not be written; the previous one is intact."""

    exit_code = 1


class _Failed(Exception):
    def __init__(self, path: Path, exc: OSError):
        super().__init__(str(exc))
        self.path, self.exc = path, exc


def step_name(step: int) -> str:
    return f"step-{step:08d}"


STEP_NAME = re.compile(r"step-(\d{8})")


def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _yield_cpu_to_training(niceness: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread, and threads it starts inherit it,
    the hashing helper included). Where the background write and the training loop's host thread compete for
    a core, the scheduler then gives the core to training; an idle core still runs the write at full speed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not allowed: the write just runs at normal priority
        pass


class _HashingWriter:
    """Write-only file object that counts and hashes what passes through and keeps the OSError it hit
    (torch.save turns a failed write into an opaque RuntimeError). A large write (torch.save writes each tensor
    storage at once) is cut into chunks, each hashed by a helper thread while this one writes it: both release
    the GIL, so where a second core is free the hashing costs no time."""

    CHUNK = 8 << 20

    def __init__(self, f):
        import hashlib

        self._f, self._h, self.bytes, self.error = f, hashlib.sha256(), 0, None
        self._hasher = None  # a ThreadPoolExecutor of one thread, from the first large write on

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        try:
            if n <= self.CHUNK:
                self._f.write(view)
                self._h.update(view)
            else:
                if self._hasher is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._hasher = ThreadPoolExecutor(1, thread_name_prefix="mbl-sha256")
                for start in range(0, n, self.CHUNK):
                    chunk = view[start:start + self.CHUNK]
                    hashed = self._hasher.submit(self._h.update, chunk)
                    try:
                        self._f.write(chunk)
                    finally:
                        hashed.result()
        except OSError as exc:
            self.error = exc
            raise
        self.bytes += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def write_file(path: Path, fill) -> dict:
    """Create `path` with fill(file), fsync it; returns its manifest entry {"bytes", "sha256"}, computed while
    writing (no second read). A failed write raises the OSError itself (errno and path intact)."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            try:
                fill(writer)
            finally:
                writer.close()
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        if writer is not None and writer.error is not None and exc is not writer.error:
            raise writer.error from exc
        raise
    return {"bytes": writer.bytes, "sha256": writer.hexdigest()}


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and every file matches its manifest, else what is wrong."""
    if not (folder / contract.COMPLETE_MARKER).exists():
        return f"no {contract.COMPLETE_MARKER} marker"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST_FILE} ({exc})"
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.exists():
            return f"missing file {rel}"
        if path.stat().st_size != info["bytes"]:
            return f"{rel}: size {path.stat().st_size} != {info['bytes']}"
        if file_sha256(path) != info["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


class _Write:
    """One save of this rank: its files (written, or queued for the background thread) and its outcome."""

    def __init__(self, step: int, tmp: Path, final: Path, state: dict, t0: float, snapshot: Snapshot | None):
        self.step, self.tmp, self.final, self.state, self.t0, self.snapshot = step, tmp, final, state, t0, snapshot
        # queued for the thread: (path or None for a fault point alone, fill(file), the fault point after it)
        self.files: list[tuple[Path | None, object, str | None]] = []
        self.written: dict[Path, dict | None] = {}  # path -> its manifest entry (None: hashed at the commit)
        self.errors: list[tuple[Path, BaseException]] = []
        self.thread: threading.Thread | None = None
        self.blocked = self.seconds = 0.0
        self.error: CheckpointError | None = None

    def host(self, obj):
        """obj, or its host copy in a background save."""
        return obj if self.snapshot is None else self.snapshot.copy(obj)


class Checkpointer:
    """Saving, finding and loading checkpoints of one run directory, on every rank."""

    def __init__(self, run_dir: Path, spec, rank: int, world: int, log=print, device=None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / contract.CHECKPOINTS_DIR
        self.spec, self.rank, self.world, self.log = spec, rank, world, log
        self.device = device if device is not None else torch.device("cpu")  # the engine's: poll()'s all_reduce
        self.save_seconds: float | None = None  # measured, start to durable; used by the deadline check
        self.before_commit = None  # rank 0: called before a checkpoint is committed; raises to refuse it
        self.greater_is_better = False
        self._fault_at = self._parse_fault(os.environ.get("MBL_FAULT_AT", ""))
        self._fault_rank = int(os.environ.get("MBL_FAULT_RANK", "0"))
        self._save_delay = self._parse_delay("MBL_FAULT_SAVE_DELAY")
        self._write_delay = self._parse_delay("MBL_FAULT_WRITE_DELAY")
        self._pool = HostPool()  # host buffers of the background saves, reused from one save to the next
        self._group = None  # the background writers' process group (gloo), made at the first background save
        self._job: _Write | None = None  # the background save in flight
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ---- fault injection (tests) ------------------------------------------------------------------

    @staticmethod
    def _parse_fault(value: str) -> tuple[str, int | None] | None:
        if not value:
            return None
        point, _, at = value.partition("@")
        if point not in FAULT_POINTS:
            raise ValueError(f"MBL_FAULT_AT={value!r}: unknown point {point!r}; points: {', '.join(FAULT_POINTS)}")
        return point, int(at) if at else None

    @staticmethod
    def _parse_delay(name: str) -> tuple[float, int | None] | None:
        value = os.environ.get(name, "")
        if not value:
            return None
        seconds, _, at = value.partition("@")
        try:
            delay = float(seconds), int(at) if at else None
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected <seconds>[@<step>]") from None
        return delay if delay[0] > 0 else None

    def _delay(self, step: int, background: bool = False) -> None:
        delay = self._write_delay if background else self._save_delay
        if delay is None or self.rank != self._fault_rank:
            return
        seconds, at = delay
        if at is not None and at != step:
            return
        name, where = (("MBL_FAULT_WRITE_DELAY", "the background write") if background
                       else ("MBL_FAULT_SAVE_DELAY", "the save"))
        print(f"[mbl] {name}: rank {self.rank} sleeps {seconds:g}s inside {where} of step {step} "
              "(temporary folder ready, nothing written)", flush=True)
        time.sleep(seconds)  # a stop signal runs its handler (sets the flag) and the sleep goes on (PEP 475)
        print(f"[mbl] {name}: rank {self.rank} goes on with {where} of step {step}", flush=True)

    def _fault(self, point: str, step: int) -> None:
        if self._fault_at is None or self.rank != self._fault_rank:
            return
        name, at = self._fault_at
        if name != point or (at is not None and at != step):
            return
        print(f"[mbl] MBL_FAULT_AT: SIGKILL at {point} of step {step} (rank {self.rank}): {FAULT_POINTS[point]}",
              flush=True)
        sys.stderr.flush()
        if os.environ.get("MBL_FAULT_KILL") == "group":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    # ---- saving -----------------------------------------------------------------------------------

    def save(self, engine, state: dict, rank_state: dict, background: bool = False) -> Path:
        """Collective: every rank calls it at the same step, with the same `background`. Returns the final
        folder. First waits for a save still being written (and raises its error).

        background=False: returns once the checkpoint is complete and `latest`. background=True: returns once
        the state is copied to host memory; a thread writes and commits it while training goes on, and
        `poll()` or `wait()` sees it end. Raises CheckpointError on every rank when a write failed anywhere
        (the previous checkpoint is left as it was): here, or for a background save, where it ends."""
        self.wait()
        t0 = time.time()
        step = state["step"]
        name = step_name(step)
        tmp, final = self.dir / (TMP_PREFIX + name), self.dir / name
        problem = None
        if self.rank == 0:
            try:
                for old in (tmp, final):  # a save killed at this step; a corrupt copy that resume skipped
                    if old.exists() or old.is_symlink():
                        self._remove(old)
                tmp.mkdir()
            except OSError as exc:
                problem = self._describe(tmp, exc)
        self._raise_if(self._gather(problem), step, tmp)
        self._fault("begin", step)
        self._delay(step)

        job = _Write(step, tmp, final, state, t0, Snapshot(self._pool) if background else None)
        with self._route_deepspeed_writes(engine, job):
            engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False)
        self._add(job, None, None, "deepspeed")
        path = tmp / f"rank-{self.rank:05d}.pt"
        try:
            payload = job.host({**rank_state, "rng": rng_state()})
            self._add(job, path, lambda f: torch.save(payload, f), "rank-state")
        except Exception as exc:  # noqa: BLE001 - no host memory for the copy: reported like a failed write
            job.errors.append((path, exc))
        if self.rank == 0:
            blob = json.dumps(state, indent=1).encode()
            self._add(job, tmp / STATE_FILE, lambda f: f.write(blob), "trainer-state")
        if not background:
            self._conclude(job, group=None)
            self.save_seconds = time.time() - t0
            self.log(f"checkpoint step {step} saved in {self.save_seconds:.1f}s")
            return final
        job.snapshot.ready()  # the copies are in host memory: training may change the state from here on
        job.blocked = time.time() - t0
        if self._group is None:  # collective: every rank makes it at the same (first) background save
            self._group = dist.new_group(backend="gloo", timeout=self._timeout())
        job.thread = threading.Thread(target=self._write_in_background, args=(job,), daemon=True,
                                      name=f"mbl-checkpoint-{step}")
        self._job = job
        job.thread.start()
        return final

    def _timeout(self):
        """The spec's collective timeout (distributed.collective_timeout_seconds), as the default group has it."""
        from datetime import timedelta

        seconds = getattr(getattr(self.spec, "distributed", None), "collective_timeout_seconds", None)
        return timedelta(seconds=seconds) if seconds else None

    def poll(self) -> None:
        """Collective, at a step boundary: when a background save is in flight and every rank's write of it is
        over, end it (log it, or raise its CheckpointError on every rank). One all_reduce, only while one is
        in flight."""
        job = self._job
        if job is None:
            return
        done = torch.full((1,), 0 if job.thread.is_alive() else 1, dtype=torch.int32, device=self.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            self._end(job)

    def wait(self) -> None:
        """Every rank at the same point: block until the background save in flight, if any, is durable and
        `latest` (or raise its CheckpointError on every rank)."""
        job = self._job
        if job is not None:
            job.thread.join()
            self._end(job)

    @property
    def in_flight(self) -> int | None:
        """The step of the background save being written, if any."""
        return self._job.step if self._job is not None else None

    def _end(self, job: _Write) -> None:
        self._job = None
        job.snapshot.release()
        if job.error is not None:
            raise job.error
        self.save_seconds = job.seconds
        self.log(f"checkpoint step {job.step} saved in {job.seconds:.1f}s (written in the background; training "
                 f"was blocked {job.blocked:.1f}s for the copy of {job.snapshot.nbytes / 1e9:.2f} GB to host memory)")

    def _write_in_background(self, job: _Write) -> None:
        """The thread of a background save: this rank's files, then the ranks' agreement and rank 0's commit on
        the writers' own process group. Its outcome is the same on every rank."""
        try:
            _yield_cpu_to_training()
            self._delay(job.step, background=True)
            for path, fill, point in job.files:
                self._write_one(job, path, fill, point)
            self._conclude(job, group=self._group)
        except CheckpointError as exc:
            job.error = exc
        except BaseException as exc:  # noqa: BLE001 - surfaces in the main thread at poll() / wait()
            job.error = CheckpointError(
                f"checkpoint {step_name(job.step)} could not be written: rank {self.rank}: the background write "
                f"failed: {type(exc).__name__}: {exc}", "see the error above; start the job again to resume from "
                "`latest`")
        finally:
            job.seconds = time.time() - job.t0

    def _add(self, job: _Write, path: Path | None, fill, point: str | None) -> None:
        """One file of this rank's part (path None: just the fault point): written now in a blocking save,
        queued for the thread in a background one."""
        if job.snapshot is not None:
            job.files.append((path, fill, point))
        else:
            self._write_one(job, path, fill, point)

    def _write_one(self, job: _Write, path: Path | None, fill, point: str | None) -> None:
        """write_file, with a failure recorded instead of raised; once one failed, the rest are skipped."""
        if job.errors:
            return
        if path is not None:
            try:
                job.written[path] = write_file(path, fill)
            except Exception as exc:  # noqa: BLE001 - reported once every rank is done writing
                job.errors.append((path, exc))
                return
        if point is not None:
            self._fault(point, job.step)

    def _conclude(self, job: _Write, group) -> None:
        """Collective on `group`: every rank's problems and records to rank 0, which commits; the outcome to
        every rank. Raises the same CheckpointError on every rank when anything failed."""
        step, tmp = job.step, job.tmp
        problem = self._describe(*job.errors[0]) if job.errors else None
        records = {str(p.relative_to(tmp)): info for p, info in job.written.items()}
        gathered = self._gather((problem, records), group)
        self._raise_if([p for p, _ in gathered], step, tmp)
        self._fault("gathered", step)

        problem = None
        if self.rank == 0:
            files = {}
            for _, rank_records in gathered:
                files.update(rank_records)
            try:
                if self.before_commit is not None:
                    self.before_commit()  # the lease: a job that lost the run directory never moves `latest`
                self._commit(tmp, job.final, job.state, files)
            except _Failed as failed:
                problem = self._describe(failed.path, failed.exc)
            except MblError as exc:
                problem = f"rank 0: {exc}"
        box = [problem]
        dist.broadcast_object_list(box, src=0, group=group)
        self._raise_if([box[0]], step, tmp)

    @contextmanager
    def _route_deepspeed_writes(self, engine, job: _Write):
        """While DeepSpeed saves: each of its files goes through write_file (hashed and fsynced while written;
        in a background save, from a host copy taken now, by the thread later), and a failed write is recorded
        instead of raised, so that this rank still takes part in every collective DeepSpeed runs after it; once
        one write failed, the rest are skipped."""
        ce = engine.checkpoint_engine
        original = ce.save
        plain = type(ce).__name__ == "TorchCheckpointEngine"
        zipfile = getattr(ce, "zipfile_serialization", True)
        count = [0]

        def save(state_dict, path):
            if job.errors:
                return
            path = Path(path)
            count[0] += 1
            point = "deepspeed-file" if count[0] == 1 else None
            if plain:
                try:
                    state_dict = job.host(state_dict)
                except Exception as exc:  # noqa: BLE001 - no host memory for the copy: reported like a failed write
                    job.errors.append((path, exc))
                    return
                self._add(job, path, lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile),
                          point)
                return
            try:  # another engine writes its own way, now (also in a background save): fsync here, hash later
                original(state_dict, str(path))
                _fsync_path(path)
                job.written[path] = None
            except Exception as exc:  # noqa: BLE001 - reported once every rank is done writing
                job.errors.append((path, exc))
                return
            if point is not None:
                self._fault(point, job.step)

        copy_scripts = getattr(engine, "_copy_recovery_script", None)

        def copy(save_path):  # zero_to_fp32.py into checkpoints/ (rank 0): a write that can fail too
            if job.errors:
                return
            try:
                copy_scripts(save_path)
            except OSError as exc:
                job.errors.append((Path(save_path), exc))

        ce.save = save
        if copy_scripts is not None:
            engine._copy_recovery_script = copy
        try:
            yield
        finally:
            del ce.save
            if copy_scripts is not None:
                del engine._copy_recovery_script

    def _commit(self, tmp: Path, final: Path, state: dict, files: dict) -> None:
        """Rank 0: manifest, marker, rename, `latest`, retention. A failed write raises _Failed, after putting
        checkpoints/ and `latest` back as they were."""
        step = state["step"]
        path = tmp
        try:
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):  # a file no rank reported
                rel = str(path.relative_to(tmp))
                if files.get(rel) is None:
                    files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            manifest = json.dumps({"step": step, "files": dict(sorted(files.items()))}, indent=1).encode()
            path = tmp / MANIFEST_FILE
            write_file(path, lambda f: f.write(manifest))
            self._fault("manifest", step)
            path = tmp / contract.COMPLETE_MARKER
            write_file(path, lambda f: f.write(b"ok\n"))
            self._fault("marker", step)
            path = tmp
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _Failed(path, exc) from exc
        self._fault("renamed", step)
        try:
            self._write_latest(final.name, step)
        except OSError as exc:  # complete but not `latest`: take it away again, so that nothing changed
            try:
                self._remove(final)
            except OSError:
                pass
            raise _Failed(self.run_dir / (contract.LATEST_FILE + ".tmp"), exc) from exc
        try:
            self.retain(step)
        except OSError as exc:  # the new checkpoint is complete and `latest`: deletion can wait for the next save
            self.log(f"warning: retention failed ({exc}); older checkpoints are deleted at the next save")

    def _write_latest(self, name: str, step: int) -> None:
        latest = self.run_dir / contract.LATEST_FILE
        tmp = latest.with_name(latest.name + ".tmp")
        try:
            write_file(tmp, lambda f: f.write(f"{contract.CHECKPOINTS_DIR}/{name}\n".encode()))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._fault("latest", step)
        os.replace(tmp, latest)
        _fsync_path(self.run_dir)

    def _gather(self, value, group=None) -> list:
        """Collective: every rank's value, in rank order."""
        out = [None] * self.world
        dist.all_gather_object(out, value, group=group)
        return out

    def _describe(self, path: Path, exc: BaseException) -> str:
        try:
            where = path.relative_to(self.run_dir)
        except ValueError:
            where = path
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device (ENOSPC)" if exc.errno == errno.ENOSPC else "disk quota exceeded (EDQUOT)"
            try:
                usage = shutil.disk_usage(self.dir)
                room = f"; {_size(usage.free)} free of {_size(usage.total)} on the file system of {self.dir}"
            except OSError:
                room = ""
            return f"rank {self.rank}: {what} writing {where}{room}"
        return f"rank {self.rank}: writing {where} failed: {type(exc).__name__}: {exc}"

    def _raise_if(self, problems: list, step: int, tmp: Path) -> None:
        """Collective outcome: the same CheckpointError on every rank if any rank had a problem."""
        problems = [p for p in problems if p]
        if not problems:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = self.run_dir / contract.LATEST_FILE
        previous = latest.read_text().strip() if latest.exists() else None
        kept = (f"{previous} is intact and still `latest`" if previous else "there is no earlier checkpoint")
        try:  # what a checkpoint of this run takes, from the previous one's manifest
            files = json.loads((self.run_dir / previous / MANIFEST_FILE).read_text())["files"]
            kept += f" (a checkpoint of this run takes {_size(sum(f['bytes'] for f in files.values()))})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        full = any("(ENOSPC)" in p or "(EDQUOT)" in p for p in problems)
        fix = ("free space on that file system (or raise the quota), lower checkpoint.keep_last, or point "
               "checkpoint.dir at a larger volume" if full else f"check that {self.dir} is writable from every node")
        raise CheckpointError(
            f"checkpoint {step_name(step)} could not be written: " + "; ".join(problems)
            + f". Its folder was removed; {kept}.",
            fix + "; then start the job again" + (f": it resumes from {previous}" if previous else ""))

    # ---- retention --------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (no checksum check: that is done on resume)."""
        if not self.dir.exists():
            return []
        found = [p for p in self.dir.iterdir() if STEP_NAME.fullmatch(p.name) and not p.is_symlink()
                 and (p / contract.COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda p: p.name)

    def retain(self, step: int | None = None) -> None:
        """Rank 0, after checkpoint `step` is complete and `latest`: keep the checkpoint.keep_last newest
        complete checkpoints up to `step` plus the best one, delete the other ones up to `step`, and the
        leftovers of killed saves and deletions. Checkpoints after `step` (a run resumed from an earlier
        `latest`) are left alone: saving that step again replaces them."""
        done = [p for p in self.complete() if step is None or step_of(p) <= step]
        keep = set(done[-self.spec.checkpoint.keep_last:])
        best = self._best(done)
        if best is not None:
            keep.add(best)
        for path in done:
            if path not in keep:
                self._remove(path, step)
        for path in list(self.dir.iterdir()):
            if path.name.startswith((TMP_PREFIX, DEL_PREFIX)):
                self._remove(path)

    def _best(self, done: list[Path]) -> Path | None:
        """The checkpoint at the run's best evaluation (best_step of the newest state), else the best metric."""
        states = {}
        for path in done:
            try:
                states[path] = json.loads((path / STATE_FILE).read_text())
            except (OSError, ValueError):
                continue
        if not states:
            return None
        best_step = states[max(states, key=lambda p: p.name)].get("best_step")
        for path in states:
            if best_step is not None and step_of(path) == best_step:
                return path
        scored = [((s["metric"] if self.greater_is_better else -s["metric"]), p.name, p)
                  for p, s in states.items() if s.get("metric") is not None]
        return max(scored)[2] if scored else None

    def _remove(self, path: Path, step: int | None = None) -> None:
        """Delete a folder directly inside checkpoints/. A step-N folder is first renamed to .del-step-N (one
        atomic step out of the step-* names, so a half-deleted checkpoint never counts). A symlink is unlinked,
        never followed; shutil.rmtree does not follow the links inside either; nothing outside checkpoints/."""
        if path.parent != self.dir:
            raise ValueError(f"refusing to delete {path}: not inside {self.dir}")
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        if STEP_NAME.fullmatch(path.name):
            trash = self.dir / (DEL_PREFIX + path.name)
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(path, trash)
            if step is not None:
                self._fault("retention", step)
            path = trash
        shutil.rmtree(path)

    # ---- resuming ---------------------------------------------------------------------------------

    def find(self) -> Path | None:
        """Rank 0 picks the checkpoint to resume from (latest, else the newest complete one that verifies);
        the choice is broadcast so every rank loads the same one."""
        choice = [None]
        if self.rank == 0:
            candidates = []
            latest = self.run_dir / contract.LATEST_FILE
            if latest.exists():
                named = latest.read_text().strip()
                path = self.run_dir / named
                if path.parent == self.dir and STEP_NAME.fullmatch(path.name):
                    candidates.append(path)
                else:
                    self.log(f"warning: {contract.LATEST_FILE} names {named!r}, not a checkpoint of this run; ignored")
            candidates += [p for p in reversed(self.complete()) if p not in candidates]
            for path in candidates:
                problem = verify(path) if path.exists() else "does not exist"
                if problem is None:
                    choice[0] = str(path)
                    break
                self.log(f"warning: checkpoint {path.relative_to(self.run_dir)} is unusable ({problem}); "
                         "trying the one before it")
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Load DeepSpeed state and this rank's trainer state; refuse a changed spec. A checkpoint of another
        world size (the global batch is part of the fingerprint, so it is the same) is converted first."""
        state = json.loads((path / STATE_FILE).read_text())
        fingerprint = self.spec.training_fingerprint()
        if state["fingerprint"] != fingerprint:
            raise ResumeError(
                f"{path} was written by a spec with training fingerprint {state['fingerprint']}, this spec has "
                f"{fingerprint}: the model, data or optimizer settings changed",
                "restore the original spec, or start a new run (another name or checkpoint.dir)")
        saved_world = int(state["world_size"])
        if saved_world == self.world:
            engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        else:
            self._load_resharded(engine, path, saved_world)
        # Data positions and RNG states are per rank. On another world size, rank r takes the RNG states of
        # saved rank r % N (the batches are seeded by sample, not by rank, so they do not depend on it).
        rank_state = torch.load(path / f"rank-{self.rank % saved_world:05d}.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        if saved_world != self.world:
            rank_state["position"] = None  # the caller checks the global position instead
        return state, rank_state

    def _load_resharded(self, engine, path: Path, saved_world: int) -> None:
        """DeepSpeed state saved by `saved_world` ranks into this job's ranks. ZeRO 0 keeps the whole model and
        optimizer state in every rank's copy: loaded as it is. ZeRO 1-3 partition the optimizer state (ZeRO 3 the
        weights too) by rank: rank 0 converts the checkpoint to DeepSpeed's universal format (one file per
        parameter and state, no partitions) next to it, every rank loads its own partition of that, and the
        conversion is removed again. The checkpoint itself is never changed."""
        stage = self.spec.distributed.zero_stage
        what = f"{path.relative_to(self.run_dir)} from {saved_world} to {self.world} ranks"
        if stage == 0:
            engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            self.log(f"resharded {what}: ZeRO 0 state is whole on every rank, nothing to convert")
            return
        t0 = time.time()
        scratch = self.dir / f"{TMP_PREFIX}universal-{path.name}"  # never counts as a checkpoint
        problem = None
        if self.rank == 0:
            try:
                if scratch.exists():  # a conversion that was killed
                    shutil.rmtree(scratch)
                scratch.mkdir()
                _to_universal(path, scratch / path.name)  # (it writes `latest_universal` next to its output)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                problem = f"{exc.__class__.__name__}: {exc}"
        problem = self._gather(problem)[0]
        if problem is not None:
            raise ResumeError(
                f"converting {what} (DeepSpeed universal checkpoint, ZeRO {stage}) failed: {problem}",
                f"resume on {saved_world} ranks (distributed.nodes x gpus_per_node), or start a new run")
        engine._config.load_universal_checkpoint = True  # read by the engine and the ZeRO optimizer while loading
        try:
            engine.load_checkpoint(str(scratch), tag=path.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
        self.log(f"resharded {what}: converted to DeepSpeed's universal checkpoint (ZeRO {stage}) and loaded in "
                 f"{time.time() - t0:.1f}s")

def _to_universal(path: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: the node's cores belong to the job's ranks)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines; the outcome is logged by the caller
        ds_to_universal.main(args)


class StopFlag:
    """SIGUSR1/SIGTERM only set a flag; `should_stop` is collective (an all_reduce at every step boundary, on
    `device`: the engine's, as NCCL needs) and also fires when env MBL_DEADLINE (unix time) is closer than the
    measured save time + margin + two steps.

    The all_reduce started at one boundary is read at the next one, so that no boundary waits for it: on a GPU
    the host never drains the stream for it (the result comes back by a copy to pinned memory and an event, which
    the next boundary finds long passed), on the CPU the collective runs on gloo's thread while the next step
    computes. Every rank reads the same reduced value at the same step, so they all stop at the same step: the
    boundary after the one where a rank saw the signal (one step later than a blocking check would)."""

    def __init__(self, device=None, margin: float | None = None):
        self.device = device if device is not None else torch.device("cpu")
        self.signal: int | None = None
        self.deadline = float(os.environ["MBL_DEADLINE"]) if os.environ.get("MBL_DEADLINE") else None
        self.margin = margin if margin is not None else float(os.environ.get("MBL_DEADLINE_MARGIN", "60"))
        self._pending = None  # (wait, value, reason) of the all_reduce started at the previous boundary
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal = signum

    def should_stop(self, save_seconds: float | None, step_seconds: float) -> tuple[bool, str]:
        """Collective: (stop, why), from what the ranks saw at the previous boundary."""
        local = 1 if self.signal is not None else 0
        reason = f"signal {signal.Signals(self.signal).name}" if self.signal else ""
        if self.deadline is not None:  # the stop comes a boundary later: two steps, then the save
            needed = (save_seconds if save_seconds is not None else 30.0) + self.margin + 2 * step_seconds
            if self.deadline - time.time() < needed:
                local, reason = 1, reason or f"time limit (MBL_DEADLINE in {self.deadline - time.time():.0f}s)"
        # torch.full fills on the device (the value is a kernel argument); torch.tensor([...], device=cuda) would
        # copy from pageable host memory, and such a copy synchronizes the stream.
        flag = torch.full((1,), local, dtype=torch.int32, device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # the current stream waits for the collective; the host does not
            value = torch.empty(1, dtype=torch.int32, pin_memory=True)
            value.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            pending = (done.synchronize, value, reason)
        else:
            pending = (work.wait, flag, reason)
        previous, self._pending = self._pending, pending
        return (False, "") if previous is None else self._read(previous, reason)

    def drain(self) -> None:
        """Finish the all_reduce in flight, if any (its answer is not needed): at the end of the loop."""
        previous, self._pending = self._pending, None
        if previous is not None:
            previous[0]()

    @staticmethod
    def _read(pending, now: str) -> tuple[bool, str]:
        wait, value, then = pending
        wait()
        stop = bool(value.item())
        return stop, (then or now or "another rank") if stop else ""
