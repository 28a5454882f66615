"""The launch outcome, in one place: the table that turns how an attempt ended into done / requeue / failed,
and the per-node records of it in the run directory that `mbl status` reads.

`jobs.launch` (on every node, inside the job) classifies and writes; the launcher only reads. Pure Python:
no torch, so the launcher can import it.

How an attempt ended -> outcome (the first row that matches):

| what happened                                                          | outcome | exit |
|------------------------------------------------------------------------|---------|------|
| every rank exited 0                                                    | done    | 0    |
| this node got SIGTERM/SIGUSR1/SIGINT/... (forwarded to the ranks,       | requeue | 143  |
|   which save within checkpoint.save_grace_seconds)                     |         |      |
| a rank exited 2: bad input (a missing file, a changed spec)            | failed  | 1    |
| the preflight found a bad node (exit 77; on Slurm the next attempt     | requeue | 143  |
|   excludes it), while restarts after failures remain                   |         |      |
| a rank's watchdog saw no progress (exit 76, its stacks in the log),   | requeue | 143  |
|   and fewer than max(1, max_restarts) restarts after failures so far   |         |      |
| every failed rank exited 75 ("saved, requeue me") or was killed after  | requeue | 143  |
|   another one asked                                                    |         |      |
| any other failure (a crash, a killed rank, a rendezvous error), and     | requeue | 143  |
|   the newest complete checkpoint advanced during this attempt, and      |         |      |
|   fewer than max_restarts such restarts of this job so far             |         |      |
| any other failure                                                       | failed  | 1    |

Each node records its outcome in `<run_dir>/logs/outcome-<job>-<attempt>.<host>-<pid>.json`.
"""

from __future__ import annotations

import json
import re
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher import contract

OUTCOME_PREFIX = "outcome-"
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes shows it as the container's termination message


@dataclass
class Outcome:
    outcome: str  # done | requeue | failed
    cause: str  # done | signal | usage | hang | saved | crash
    reason: str

    @property
    def exit_code(self) -> int:
        return {"done": contract.LAUNCH_DONE, "requeue": contract.LAUNCH_REQUEUE}.get(self.outcome,
                                                                                     contract.LAUNCH_FAILED)


def classify(codes: dict[int, int], signal_name: str | None, error: str | None, step_before: int | None,
             step_after: int | None, crash_restarts: int, max_restarts: int) -> Outcome:
    """The table of the module docstring. `codes`: rank -> exit code of the ranks that failed (negative: killed
    by that signal); `error`: a failure of torchrun itself (rendezvous, ...)."""
    saved = "" if step_after is None else f"; newest checkpoint step {step_after}"
    if not codes and signal_name is None and error is None:
        return Outcome("done", "done", "every rank finished")
    if signal_name is not None:
        return Outcome("requeue", "signal", f"{signal_name}: the ranks were asked to save and stop{saved}")
    failed = sorted(codes.items())
    listing = ", ".join(f"rank {r}: {_code(c)}" for r, c in failed[:8]) + (" ..." if len(failed) > 8 else "")
    if any(c == contract.USAGE_EXIT_CODE for _, c in failed):
        return Outcome("failed", "usage", f"bad input ({listing}); the error is in the log above; fix it and "
                                          "submit again")
    if any(c == contract.NODE_EXIT_CODE for _, c in failed):
        what = f"the preflight found a bad node (named in the log and in logs/bad-nodes-<job>; {listing})"
        if crash_restarts >= max(1, max_restarts):
            return Outcome("failed", "node", f"{what}, and the restarts after failures allowed are used up")
        return Outcome("requeue", "node", f"{what}: restart {crash_restarts + 1} without it{saved}")
    hung = [r for r, c in failed if c == contract.HANG_EXIT_CODE]
    if hung:
        ranks = ", ".join(map(str, hung[:8])) + (" ..." if len(hung) > 8 else "")
        what = f"no progress on rank(s) {ranks} for the hang limit; their stacks are in the log ({listing})"
        if crash_restarts >= max(1, max_restarts):
            return Outcome("failed", "hang", f"{what}, and the {max(1, max_restarts)} restart(s) after failures "
                                             f"allowed are used up{saved}")
        return Outcome("requeue", "hang", f"{what}: restart {crash_restarts + 1} from the newest checkpoint{saved}")
    if failed and all(c == contract.REQUEUE_EXIT_CODE or c < 0 for _, c in failed) and any(
            c == contract.REQUEUE_EXIT_CODE for _, c in failed):
        return Outcome("requeue", "saved", f"the ranks saved and asked to be requeued ({listing}){saved}")
    what = error or listing
    progressed = step_after is not None and (step_before is None or step_after > step_before)
    since = f"step {step_before}" if step_before is not None else "no checkpoint"
    if not progressed:
        return Outcome("failed", "crash", f"failed ({what}) without a new checkpoint since the attempt started "
                                          f"({since}): a restart would fail the same way")
    if crash_restarts >= max_restarts:
        return Outcome("failed", "crash", f"failed ({what}) after progress ({since} -> step {step_after}), but "
                                          f"the {max_restarts} restart(s) after failures allowed are used up")
    return Outcome("requeue", "crash", f"failed ({what}) after progress ({since} -> step {step_after}): restart "
                                       f"{crash_restarts + 1} of at most {max_restarts}")


def _code(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def newest_step(run_dir: Path) -> int | None:
    """The step of the checkpoint `latest` names (only complete checkpoints are ever named there)."""
    try:
        name = (run_dir / contract.LATEST_FILE).read_text().strip()
        return int(name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return None



def records(run_dir: Path) -> list[dict]:
    """Every node's outcome record in the run directory, oldest attempt first."""
    found = []
    for path in (run_dir / contract.LOGS_DIR).glob(OUTCOME_PREFIX + "*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: (r.get("attempt", 0), r.get("time", 0)))


def crash_restarts(run_dir: Path, job: str) -> int:
    """Restarts this job already had after failures (cause crash, hang or node; outcome requeue), per attempt."""
    return len({r.get("attempt") for r in records(run_dir)
                if r.get("job") == job and r.get("cause") in ("crash", "hang", "node") and r.get("outcome") == "requeue"})


def write_record(run_dir: Path, record: dict) -> None:
    logs = run_dir / contract.LOGS_DIR
    try:
        logs.mkdir(parents=True, exist_ok=True)
        job = re.sub(r"[^A-Za-z0-9_.-]", "_", str(record["job"]))
        node = f"{record['host']}-{record.get('pid', os.getpid())}"  # two nodes may share a host name (containers)
        path = logs / f"{OUTCOME_PREFIX}{job}-{record['attempt']}.{node}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # the exit code still tells the backend; the record is for people
        print(f"mbl launch: could not record the outcome in {logs}: {exc}", file=sys.stderr, flush=True)
    if os.path.exists(TERMINATION_LOG) and os.access(TERMINATION_LOG, os.W_OK):
        try:
            with open(TERMINATION_LOG, "w") as fh:
                fh.write(f"{record['outcome']}: {record['reason']}"[:4000])
        except OSError:
            pass


def last_outcome(run_dir: str | Path) -> str:
    """The newest attempt's outcome in words (the worst node's), "" when none was recorded."""
    recs = records(Path(run_dir))
    if not recs:
        return ""
    newest = max(recs, key=lambda r: r.get("time", 0))
    attempt = [r for r in recs if r.get("job") == newest.get("job") and r.get("attempt") == newest.get("attempt")]
    rank = {"failed": 0, "requeue": 1, "done": 2}
    worst = min(attempt, key=lambda r: rank.get(r.get("outcome"), 0))
    return f"attempt {worst.get('attempt')}: {worst.get('outcome')}: {worst.get('reason')}"
