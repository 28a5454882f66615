"""What the node preflight costs: its own seconds as the trainer logs them, and a whole short job with and without.

    python bench/bench_preflight.py [--runs 3] [--ranks 2]

A tiny pre-training (examples/pretrain-tiny.yaml, 2 steps, one save, one evaluation) under torchrun with --ranks
CPU processes (gloo), once with `distributed.preflight: true` and once with false, alternating, --runs times,
on data prepared once beforehand. The preflight (jobs/preflight.py): the accelerator check, a warm-up and a timed
all-reduce of `preflight_allreduce_mb` (16 MB on CPUs), rank 0's token read back by every rank from the run
directory, the free-space check, and a gather of the results. Reported: the "passed in" seconds of its log line,
the all-reduce's bus bandwidth, and the job's wall time (torchrun start to exit) with and without.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LINE = re.compile(r"preflight: \d+ ranks on \d+ host\(s\) passed in ([0-9.]+)s; all-reduce of (\d+) MB: (\d+) ms, "
                  r"bus bandwidth ([0-9.]+) GB/s")


def spec_file(run: Path, sets: list[str]) -> str:
    from launcher.loading import load_spec
    from launcher.rundir import write_spec

    spec = load_spec(REPO / "examples/pretrain-tiny.yaml", sets=[f"checkpoint.dir={run}", *sets])
    return str(write_spec(spec.resolved(REPO)))


def job(spec: str, ranks: int) -> tuple[float, str]:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m",
           "jobs.train", "--spec", spec]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    short = ["train.max_steps=2", "train.warmup_steps=0", "checkpoint.every_steps=2", "train.eval_every_steps=2",
             "train.eval_batches=1", f"distributed.gpus_per_node={args.ranks}"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prepare"
        job(spec_file(data, short), args.ranks)  # prepares the data once (rank 0), then trains 2 steps
        walls: dict[str, list[float]] = {"true": [], "false": []}
        own, busbw = [], []
        for i in range(args.runs):
            for flag in ("true", "false"):
                run = Path(tmp) / f"{flag}-{i}"
                wall, out = job(spec_file(run, [*short, f"data.prepared={data}", f"distributed.preflight={flag}"]),
                                args.ranks)
                walls[flag].append(wall)
                m = LINE.search(out)
                if flag == "true":
                    if not m:
                        raise SystemExit(f"no preflight line in the log of {run}")
                    own.append(float(m.group(1)))
                    busbw.append(float(m.group(4)))
                elif m:
                    raise SystemExit(f"{run}: a preflight ran with distributed.preflight=false")
    med = statistics.median
    print(f"preflight itself ({args.ranks} ranks): median {med(own):.2f} s (min {min(own):.2f}, max {max(own):.2f}); "
          f"all-reduce bus bandwidth median {med(busbw):.2f} GB/s")
    print(f"job wall time: with {med(walls['true']):.1f} s, without {med(walls['false']):.1f} s "
          f"(ranges {min(walls['true']):.1f}-{max(walls['true']):.1f}, "
          f"{min(walls['false']):.1f}-{max(walls['false']):.1f})")


if __name__ == "__main__":
    main()
