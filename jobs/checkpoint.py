"""Atomic checkpoints on shared storage, `latest`, retention, resume, and preemption signals.

    checkpoints/step-00000200/
        <DeepSpeed's files of every rank>   engine.save_checkpoint (model, optimizer, scheduler)
        trainer_state.json                  step, tokens, best metric, spec fingerprint, world size
        rank-00000.pt ...                   per rank: data position and RNG states (python, numpy, torch)
        manifest.json                       every file's size and sha256
        COMPLETE                            written last; a folder without it never counts

A save is collective: every rank writes into `checkpoints/.tmp-step-N`, fsyncs, then rank 0 writes the
manifest and the marker, renames the folder to `step-N` and replaces `latest` (tmp file + os.replace).
Only then are older checkpoints deleted (keep_last newest plus the best one).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jobs.data import file_sha256
from jobs.errors import ResumeError
from launcher import contract

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


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


class Checkpointer:
    """Saving, finding and loading checkpoints of one run directory, on every rank."""

    def __init__(self, run_dir: Path, spec, rank: int, world: int, log=print):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / contract.CHECKPOINTS_DIR
        self.spec, self.rank, self.world, self.log = spec, rank, world, log
        self.save_seconds: float | None = None  # measured; used by the deadline check
        self.greater_is_better = False
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ---- saving -----------------------------------------------------------------------------------

    def save(self, engine, state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it at the same step. Returns the final folder."""
        t0 = time.time()
        name = step_name(state["step"])
        tmp, final = self.dir / (TMP_PREFIX + name), self.dir / name
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # a corrupt copy that resume skipped: this save replaces it
                shutil.rmtree(final)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=TMP_PREFIX + name, save_latest=False)
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_path(path)
        dist.barrier()
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(json.dumps({"step": state["step"], "files": files}, indent=1))
            _fsync_path(tmp / MANIFEST_FILE)
            (tmp / contract.COMPLETE_MARKER).write_text("ok\n")
            _fsync_path(tmp / contract.COMPLETE_MARKER)
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.dir)
            self._write_latest(name)
            self.retain()
        dist.barrier()
        self.save_seconds = time.time() - t0
        return final

    def _write_latest(self, name: str) -> None:
        latest = self.run_dir / contract.LATEST_FILE
        tmp = latest.with_name(latest.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{contract.CHECKPOINTS_DIR}/{name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, latest)
        _fsync_path(self.run_dir)

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (no checksum check: that is done on resume)."""
        if not self.dir.exists():
            return []
        found = [p for p in self.dir.iterdir() if p.name.startswith("step-") and (p / contract.COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda p: p.name)

    def retain(self) -> None:
        """Keep checkpoint.keep_last newest complete checkpoints plus the best; delete the rest (rank 0)."""
        done = self.complete()
        keep = set(done[-self.spec.checkpoint.keep_last:])
        best = self._best(done)
        if best is not None:
            keep.add(best)
        root = self.dir.resolve()
        for path in done:
            if path in keep:
                continue
            if path.resolve().parent != root:  # never delete outside the run directory
                continue
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.dir.glob(TMP_PREFIX + "*"):  # leftovers of saves that never completed
            if stale.resolve().parent == root and stale.name < TMP_PREFIX + done[-1].name:
                shutil.rmtree(stale, ignore_errors=True)

    def _best(self, done: list[Path]) -> Path | None:
        scored = []
        for path in done:
            try:
                metric = json.loads((path / STATE_FILE).read_text()).get("metric")
            except (OSError, ValueError):
                continue
            if metric is not None:
                scored.append((metric if self.greater_is_better else -metric, path.name, path))
        return max(scored)[2] if scored else None

    # ---- resuming ---------------------------------------------------------------------------------

    def find(self) -> Path | None:
        """Rank 0 picks the checkpoint to resume from (latest, else the newest complete one that verifies);
        the choice is broadcast so every rank loads the same one."""
        choice = [None]
        if self.rank == 0:
            candidates = []
            latest = self.run_dir / contract.LATEST_FILE
            if latest.exists():
                candidates.append(self.run_dir / latest.read_text().strip())
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
        """Load DeepSpeed state and this rank's trainer state; refuse a changed spec or world size."""
        state = json.loads((path / STATE_FILE).read_text())
        fingerprint = self.spec.training_fingerprint()
        if state["fingerprint"] != fingerprint:
            raise ResumeError(
                f"{path} was written by a spec with training fingerprint {state['fingerprint']}, this spec has "
                f"{fingerprint}: the model, data or optimizer settings changed",
                "restore the original spec, or start a new run (another name or checkpoint.dir)")
        if state["world_size"] != self.world:
            raise ResumeError(
                f"{path} was written by {state['world_size']} ranks, this job has {self.world}; resuming on a "
                "different world size is not supported (DeepSpeed's partitioned state)",
                f"run with distributed.nodes x gpus_per_node = {state['world_size']}, or start a new run")
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        rank_state = torch.load(path / f"rank-{self.rank:05d}.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return state, rank_state


class StopFlag:
    """SIGUSR1/SIGTERM only set a flag; `should_stop` is collective (an all_reduce at the step boundary)
    and also fires when env MBL_DEADLINE (unix time) is closer than the measured save time + margin."""

    def __init__(self, margin: float | None = None):
        self.signal: int | None = None
        self.deadline = float(os.environ["MBL_DEADLINE"]) if os.environ.get("MBL_DEADLINE") else None
        self.margin = margin if margin is not None else float(os.environ.get("MBL_DEADLINE_MARGIN", "60"))
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal = signum

    def should_stop(self, save_seconds: float | None, step_seconds: float) -> tuple[bool, str]:
        local = 1 if self.signal is not None else 0
        reason = f"signal {signal.Signals(self.signal).name}" if self.signal else ""
        if self.deadline is not None:
            needed = (save_seconds if save_seconds is not None else 30.0) + self.margin + step_seconds
            if self.deadline - time.time() < needed:
                local, reason = 1, reason or f"time limit (MBL_DEADLINE in {self.deadline - time.time():.0f}s)"
        flag = torch.tensor([local], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item()), reason or "another rank"
