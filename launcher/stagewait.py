"""Wait for a pipeline's upstream stages on Kubernetes: the init container of a stage's pods.

    python -m launcher.stagewait --timeout 7200 pretrain=/shared/runs/p/pretrain [ner=/shared/runs/p/ner-...]

A stage's PyTorchJob is created with the rest of the pipeline at once (launcher/pipeline_k8s.py); its pods
first run this, on the shared volume, until every upstream run directory holds DONE (the trainer writes it
last, launcher/contract.py). It exits 0 then, and 1 with one clear line (the termination message the pod
shows, `mbl status` repeats) when an upstream run failed for good (its newest outcome record says `failed`)
or when `--timeout` seconds pass first. No workflow engine, no API access: it survives the launcher going
away, and the job's own retries do not apply (an init container failing ends the pod).

Standard library and launcher.contract/outcomes only: it starts in a second, without torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launcher.contract import DONE_FILE
from launcher.outcomes import records

TERMINATION_LOG = "/dev/termination-log"


def failed_for_good(run_dir: Path) -> str:
    """The newest attempt's outcome when it is `failed` (no retry comes), else ""."""
    found = records(run_dir)
    if not found:
        return ""
    newest = max(r.get("attempt", 0) for r in found)
    bad = [r for r in found if r.get("attempt", 0) == newest and r.get("outcome") == "failed"]
    return f"attempt {newest}: {bad[0].get('reason', 'failed')}" if bad else ""


def wait(upstream: dict[str, Path], timeout: float, poll: float = 10.0, clock=time.monotonic,
         sleep=time.sleep) -> tuple[bool, str]:
    """(True, what) once every upstream run directory holds DONE; (False, why) when one failed for good or
    `timeout` seconds passed."""
    start = clock()
    while True:
        waiting = {name: path for name, path in upstream.items() if not (path / DONE_FILE).exists()}
        if not waiting:
            return True, f"mbl: upstream done: {', '.join(upstream)}"
        for name, path in waiting.items():
            why = failed_for_good(path)
            if why:
                return False, (f"mbl: upstream stage {name} failed ({why}); this stage will not run. Fix it and "
                               "submit the pipeline again: finished stages are skipped")
        waited = clock() - start
        if waited >= timeout:
            names = ", ".join(f"{n} ({p / DONE_FILE} missing)" for n, p in waiting.items())
            return False, (f"mbl: gave up after waiting {waited:.0f}s (timeout {timeout:.0f}s) for upstream stage(s) "
                           f"{names}: they did not finish; see their `mbl status`, then submit the pipeline "
                           "again (finished stages are skipped)")
        sleep(min(poll, max(0.0, timeout - waited)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.stagewait", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, required=True, help="Seconds to wait in all.")
    parser.add_argument("--poll", type=float, default=10.0, help="Seconds between looks.")
    parser.add_argument("upstream", nargs="+", metavar="STAGE=RUN_DIR")
    args = parser.parse_args(argv)
    upstream = {}
    for item in args.upstream:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{item!r}: give STAGE=RUN_DIR")
        upstream[name] = Path(path)
    print(f"mbl: waiting up to {args.timeout:.0f}s for " + ", ".join(f"{n} ({p})" for n, p in upstream.items()),
          flush=True)
    ok, message = wait(upstream, args.timeout, args.poll)
    print(message, flush=True)
    if not ok:
        try:
            Path(TERMINATION_LOG).write_text(message)
        except OSError:
            pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
