"""How far a job is, how fast it goes, when it ends, and whether it still moves: read from its run directory.

The run directory is on shared storage, so the login node reads what rank 0 writes there:

- `metrics.jsonl`: a training row every `train.log_every_steps` (step, total_steps, loss, lr, grad_norm,
  tokens_per_s, tokens) and an evaluation row (with "split") at each evaluation;
- `latest`: the newest complete checkpoint (its step; the file's time is when it was committed);
- `lease/`: which attempt of which job writes here now, and since when (jobs/lease.py).

`Tracker` reads them incrementally (for the live progress of `mbl submit` / `mbl logs -f`); `snapshot()` of
a run directory answers `mbl status` in one read. Where the run directory is not readable from here (a
Kubernetes volume), the trainer's step lines in the log carry the same numbers: the trainer prints them with
`step_line` and the follower reads them back with `parse_step_line`, one format in one place.

Estimates: the time per step is the wall time between the training rows of the current stretch of steps
(evaluations and checkpoint saves included), so the ETA is when the job ends, not when its math would. A
running job is "possibly stuck" when nothing was written for `STALL_FACTOR` times its usual gap between rows,
twice its longest, and at least `STALL_FLOOR_SECONDS`.

Pure Python, no torch: the launcher imports it, and so does the trainer (for `step_line`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import contract

STALL_FACTOR = 10.0  # times the median gap between metrics rows
STALL_FLOOR_SECONDS = 120.0  # never flag a job quiet for less than this
RATE_ROWS = 20  # training rows the time per step is measured over


# ---- the trainer's step line ----------------------------------------------------------------------

def step_line(row: dict[str, Any]) -> str:
    """`step 20/150: loss 4.7479, lr 1.33e-03, grad norm 0.703, 10,281 tokens/s` (the trainer's log line)."""
    total = row.get("total_steps")
    parts = [f"loss {row['loss']:.4f}"]
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.2e}")
    if row.get("grad_norm") is not None:
        parts.append(f"grad norm {row['grad_norm']:.3g}")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:,.0f} tokens/s")
    return f"step {row['step']}" + (f"/{total}" if total else "") + ": " + ", ".join(parts)


_STEP_LINE = re.compile(
    r"\bstep (?P<step>\d+)(?:/(?P<total>\d+))?: loss (?P<loss>[-+.\deE]+|nan|inf)"
    r"(?:, lr (?P<lr>[-+.\deE]+))?(?:, grad norm [^,]+)?(?:, (?P<tps>[\d,.]+) tokens/s)?")


def parse_step_line(line: str) -> dict[str, Any] | None:
    """The row a `step_line` was made from (step, total_steps, loss, lr, tokens_per_s), or None."""
    m = _STEP_LINE.search(line)
    if m is None or "[mbl]" not in line:
        return None
    row: dict[str, Any] = {"step": int(m["step"]), "loss": float(m["loss"])}
    if m["total"]:
        row["total_steps"] = int(m["total"])
    if m["lr"]:
        row["lr"] = float(m["lr"])
    if m["tps"]:
        row["tokens_per_s"] = float(m["tps"].replace(",", ""))
    return row


# ---- words for numbers ----------------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """12s, 4m05s, 2h03m, 3d04h."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def number(value: float | None, digits: int = 4) -> str:
    """A loss or metric: 4 significant digits (2.394, 0.8125, 1.234e-05)."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 10 ** digits:
        return f"{value:#.{digits}g}".rstrip(".")  # 1.000, 0.8125, 69.79, 2399
    return f"{value:.{digits - 1}e}"


def rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return ""
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e4:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:,.0f}"


# ---- the state of a run ---------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What the run directory says about a job at one moment. Times are Unix seconds."""

    step: int | None = None
    total: int | None = None
    loss: float | None = None  # the newest training loss
    lr: float | None = None
    tokens_per_s: float | None = None
    evaluation: dict[str, Any] | None = None  # the newest evaluation row
    seconds_per_step: float | None = None
    last_time: float | None = None  # when the newest row was written
    started: float | None = None  # when the current attempt took the run directory (its lease)
    attempt: int | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    gaps: list[float] = field(default_factory=list)  # recent seconds between rows

    @property
    def percent(self) -> float | None:
        if self.step is None or not self.total:
            return None
        return min(100.0, 100.0 * self.step / self.total)

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until the last step, counting down from the newest row."""
        if self.step is None or not self.total or self.seconds_per_step is None:
            return None
        if self.step >= self.total:
            return 0.0
        left = (self.total - self.step) * self.seconds_per_step
        if self.last_time is not None:
            left -= max(0.0, (now or time.time()) - self.last_time)
        return max(0.0, left)

    def quiet_for(self, now: float | None = None) -> float | None:
        """Seconds since the job last wrote anything here (a row, or taking the lease)."""
        marks = [t for t in (self.last_time, self.started) if t is not None]
        return (now or time.time()) - max(marks) if marks else None

    def stall_threshold(self) -> float | None:
        """Seconds without a new row after which a running job is possibly stuck; None before two rows."""
        if len(self.gaps) < 2:
            return None
        return max(STALL_FACTOR * statistics.median(self.gaps), 2 * max(self.gaps), STALL_FLOOR_SECONDS)

    def stalled(self, now: float | None = None) -> bool:
        quiet, limit = self.quiet_for(now), self.stall_threshold()
        return quiet is not None and limit is not None and quiet > limit

    def fields(self, now: float | None = None, running: bool = True) -> dict[str, Any]:
        """The machine-readable fields of `mbl status -o json` (numbers, not words)."""
        now = now or time.time()
        stalled = running and self.stalled(now)
        eta = self.eta(now) if running and not stalled else None
        return {
            "step": self.step, "total_steps": self.total,
            "percent": None if self.percent is None else round(self.percent, 1),
            "loss": self.loss, "lr": self.lr, "tokens_per_s": self.tokens_per_s,
            "eval": self.evaluation,
            "eta_seconds": None if eta is None else round(eta),
            "checkpoint_step": self.checkpoint_step,
            "checkpoint_age_seconds": None if self.checkpoint_time is None else round(now - self.checkpoint_time),
            "attempt": self.attempt,
            "last_update_seconds": None if self.quiet_for(now) is None else round(self.quiet_for(now)),
            "stalled": stalled,
        }

    def words(self, now: float | None = None, running: bool = True) -> dict[str, str]:
        """The same, for people: step "60/150", percent "40%", loss "4.273", ETA "1m12s", checkpoint "50 (12s ago)"."""
        now = now or time.time()
        steps = "" if self.step is None else f"{self.step}/{self.total}" if self.total else str(self.step)
        checkpoint = ""
        if self.checkpoint_step is not None:
            checkpoint = f"{self.checkpoint_step}"
            if self.checkpoint_time is not None:
                checkpoint += f" ({duration(now - self.checkpoint_time)} ago)"
        note, stalled = "", running and self.stalled(now)
        if stalled:
            note = f"possibly stuck: no new metrics for {duration(self.quiet_for(now))}"
        return {
            "step": steps, "percent": "" if self.percent is None else f"{self.percent:.0f}%",
            "loss": number(self.loss), "lr": "" if self.lr is None else f"{self.lr:.2e}",
            "tokens_per_s": rate(self.tokens_per_s), "eta": duration(self.eta(now)) if running and not stalled else "",
            "checkpoint": checkpoint, "attempt": "" if self.attempt is None else str(self.attempt), "note": note,
        }


class Tracker:
    """Follows a run directory: new metrics rows as they are appended, the newest checkpoint, the lease.

    `poll()` reads what is new (cheap: from where it stopped). Without a readable metrics file, `feed_line`
    takes the trainer's step lines from the log instead."""

    def __init__(self, run_dir: str | Path | None, total: int | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.state = Snapshot(total=total)
        self._offset = 0
        self._partial = b""
        self._rate: deque[tuple[float, int]] = deque(maxlen=RATE_ROWS)  # (time, step) of training rows
        self._gaps: deque[float] = deque(maxlen=50)
        self._from_metrics = False
        self._skip_partial = False
        if self.run_dir is not None and total is None:
            self.state.total = total_from_spec(self.run_dir)

    # ---- input ------------------------------------------------------------------------------------

    def poll(self) -> Snapshot:
        if self.run_dir is None:
            return self.state
        for row in self._new_rows():
            self._from_metrics = True
            self.add_row(row)
        self._checkpoint()
        self._lease()
        return self.state

    def feed_line(self, line: str, now: float | None = None) -> None:
        """A log line; a trainer step line counts as a row while no metrics file is readable."""
        if self._from_metrics:
            return
        row = parse_step_line(line)
        if row is not None:
            self.add_row({"time": now or time.time(), **row})

    def add_row(self, row: dict[str, Any]) -> None:
        s, t = self.state, row.get("time")
        if t is not None:
            if s.last_time is not None and t >= s.last_time:
                self._gaps.append(t - s.last_time)
                s.gaps = list(self._gaps)
            s.last_time = t
        step = row.get("step")
        if "split" in row:
            s.evaluation = {k: v for k, v in row.items() if k != "time"}
            if step is not None and s.step is None:
                s.step = step
            return
        if step is None or "loss" not in row:
            return
        if s.step is not None and step < s.step:  # resumed from an earlier checkpoint: a new stretch
            self._rate.clear()
        s.step, s.loss = step, row.get("loss")
        s.lr = row.get("lr", s.lr)
        s.tokens_per_s = row.get("tokens_per_s", s.tokens_per_s)
        s.total = row.get("total_steps") or s.total
        if t is not None:
            self._rate.append((t, step))
            (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
            if s1 > s0 and t1 > t0:
                s.seconds_per_step = (t1 - t0) / (s1 - s0)

    def skip_to(self, offset: int) -> None:
        """Start reading the metrics file at `offset` (the partial line there is dropped)."""
        self._offset, self._skip_partial = offset, True

    # ---- the run directory ------------------------------------------------------------------------

    def _new_rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / contract.METRICS_FILE
        try:
            size = path.stat().st_size
            if size < self._offset:  # replaced (a new run in this directory): read it again
                self._offset, self._partial = 0, b""
            if size == self._offset:
                return []
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        if self._skip_partial and lines:
            lines, self._skip_partial = lines[1:], False
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _checkpoint(self) -> None:
        from launcher.outcomes import newest_step

        step = newest_step(self.run_dir)
        if step is None:
            return
        try:
            self.state.checkpoint_time = (self.run_dir / contract.LATEST_FILE).stat().st_mtime
        except OSError:
            return
        self.state.checkpoint_step = step

    def _lease(self) -> None:
        from launcher.rundir import current_lease

        held = current_lease(self.run_dir)
        if held is not None:
            holder = held[1]
            self.state.attempt = holder.get("attempt", self.state.attempt)
            self.state.started = holder.get("acquired", self.state.started)
            return
        self.state.started = None  # released: the attempt ended
        if self.state.attempt is None:
            from launcher.outcomes import records

            recs = records(self.run_dir)
            if recs:
                self.state.attempt = max(recs, key=lambda r: r.get("time", 0)).get("attempt")


def total_from_spec(run_dir: Path) -> int | None:
    """train.max_steps of the run directory's spec, when it fixes the number of steps (no epochs)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: `mbl list` reads one spec per job
    try:
        data = yaml.load((run_dir / contract.SPEC_FILE).read_text(), Loader=loader) or {}
    except (OSError, yaml.YAMLError):
        return None
    train = data.get("train") or {}
    if data.get("kind") == "prepare" or train.get("epochs"):
        return None
    steps = train.get("max_steps")
    return steps if isinstance(steps, int) else None


def snapshot(run_dir: str | Path, tail_bytes: int = 256 * 1024) -> Snapshot:
    """The run directory's state, read once (the metrics file's last `tail_bytes` are plenty)."""
    tracker = Tracker(run_dir)
    try:
        size = (Path(run_dir) / contract.METRICS_FILE).stat().st_size
    except OSError:
        size = 0
    if size > tail_bytes:
        tracker.skip_to(size - tail_bytes)
    return tracker.poll()
