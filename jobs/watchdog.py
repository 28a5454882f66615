"""Hang detection on every rank: no training progress for longer than a limit -> the stacks of every thread in
the attempt's log, then exit with the contract's HANG_EXIT_CODE, which `jobs.launch` turns into a requeue
(launcher/outcomes.py), so the cluster restarts the job from its newest complete checkpoint.

A rank stuck in a collective (waiting for a peer that hangs, or a dead network) makes no progress, and neither
does the peer: every rank's watchdog fires at about the same time (each waits a quarter of the limit, 5 to 60 s,
after its dump before exiting, so that torchrun does not kill the slower ones first), and the log shows which
rank was elsewhere.
The limit is `distributed.hang_timeout_seconds`, or, unset, HANG_FACTOR x the median step time seen so far,
at least HANG_FLOOR_SECONDS; before the first step (model build, compilation) and while the loop saves or
evaluates it is `distributed.collective_timeout_seconds`, which the process group also gets, so a collective
that never completes still ends the job (with torch's own error) rather than hold the GPUs forever.

Fault point for tests: MBL_FAULT_HANG=<rank>@<step>[@<attempt>] makes that rank sleep before that step's
forward (in that attempt only, when given: MBL_ATTEMPT, which jobs.launch sets).
"""

from __future__ import annotations

import faulthandler
import os
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager

from launcher import contract

HANG_FACTOR = 10
HANG_FLOOR_SECONDS = 300.0


class Watchdog:
    """beat(step, seconds) after every step; `with wd.long():` around saves and evaluations."""

    def __init__(self, rank: int, limit: float | None, long_limit: float, log=print, poll: float = 1.0):
        self.rank, self.fixed, self.long_limit, self.log, self.poll = rank, limit, long_limit, log, poll
        self.last, self.step, self.steps = time.monotonic(), 0, []
        self._long, self._started = 1, False  # before the first step: the long limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mbl-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float:
        if self._long:
            return self.long_limit
        if self.fixed is not None:
            return self.fixed
        recent = self.steps[-50:]
        return max(HANG_FLOOR_SECONDS, HANG_FACTOR * statistics.median(recent)) if recent else self.long_limit

    def beat(self, step: int, seconds: float | None = None) -> None:
        if not self._started:
            self._started, self._long = True, self._long - 1  # first step done: the step limit from now on
        self.step, self.last = step, time.monotonic()
        if seconds is not None:
            self.steps.append(seconds)

    @contextmanager
    def long(self):
        self._long += 1
        try:
            yield
        finally:
            self._long -= 1
            self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            idle, limit = time.monotonic() - self.last, self.limit()
            if idle > limit:
                self.fire(idle, limit)

    def fire(self, idle: float, limit: float) -> None:
        """Stacks of every thread (and the collectives torch has in flight, where it can say) to stderr, the
        attempt's log; then exit HANG_EXIT_CODE without running Python's shutdown (a thread is stuck)."""
        head = (f"[mbl] hang: rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}) made no progress for "
                f"{idle:.0f}s (limit {limit:.0f}s) after step {self.step}; the stacks of its threads follow, then it "
                f"exits {contract.HANG_EXIT_CODE} (requeue from the newest checkpoint)")
        print(head, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        in_flight = collectives_in_flight()
        if in_flight:
            print(f"[mbl] hang: rank {self.rank}: collectives in flight: {in_flight}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        # The peers' watchdogs fire within about a step of this one (their last step ended with ours); wait for
        # them before exiting, since torchrun kills the other ranks of the node as soon as one rank exits.
        time.sleep(min(60.0, max(5.0, 0.25 * limit)))
        os._exit(contract.HANG_EXIT_CODE)


def collectives_in_flight() -> str | None:
    """What torch's flight recorder holds for NCCL (TORCH_NCCL_TRACE_BUFFER_SIZE > 0), where it can say."""
    try:
        import pickle

        import torch

        dump = torch._C._distributed_c10d._dump_nccl_trace()  # noqa: SLF001 - the recorder's only entry point
        entries = pickle.loads(dump).get("entries", [])
        pending = [f"{e.get('profiling_name')} seq {e.get('collective_seq_id')} state {e.get('state')}"
                   for e in entries if e.get("state") != "completed"]
        return "; ".join(pending[-5:]) or None
    except Exception:  # noqa: BLE001 - gloo, no recorder, or an older torch: the stacks above still say where
        return None


def fault_hang(rank: int, step: int) -> None:
    """MBL_FAULT_HANG=<rank>@<step>[@<attempt>]: that rank sleeps (for tests of this module)."""
    spec = os.environ.get("MBL_FAULT_HANG")
    if not spec:
        return
    want_rank, want_step, *attempt = spec.split("@")
    if attempt and attempt[0] != os.environ.get("MBL_ATTEMPT", "0"):
        return
    if int(want_rank) == rank and int(want_step or 0) == step:
        print(f"[mbl] MBL_FAULT_HANG: rank {rank} sleeps at step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
