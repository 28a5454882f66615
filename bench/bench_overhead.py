"""The trainer's own cost: steps/s of `jobs.train` against a bare DeepSpeed loop, same model, data and batch.

    python bench/bench_overhead.py [--steps 120] [--runs 3] [--ranks 2]

Both run under torchrun with --ranks CPU processes (gloo) on the tiny pre-training of examples/pretrain-tiny.yaml
(tiny preset, 128 tokens, micro batch 16, global batch 32, ZeRO-1, fp32) over the same prepared data:

- mbl: `python -m jobs.launch` as the local backend starts it (lease, device moves, the stop flag checked every
  step, loss summed on the device and all-reduced every 10 steps, metrics.jsonl + TensorBoard rows); steps/s by
  the wall clock between its first and last metrics rows (steps 10 to STEPS);
- bare: the loop a DeepSpeed tutorial writes (bench/overhead_bare.py): `deepspeed.initialize` with the same
  config, then batch -> forward -> backward -> step, nothing else; steps/s after the same warm-up.

Runs alternate (mbl, bare, mbl, bare, ...) so load changes hit both; the median of --runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spec_file(tmp: Path, name: str, sets: list[str]) -> str:
    from launcher.loading import load_spec
    from launcher.rundir import write_spec

    spec = load_spec(REPO / "examples/pretrain-tiny.yaml", sets=[f"checkpoint.dir={tmp / name}", *sets])
    return str(write_spec(spec.resolved(REPO)))


def torchrun(ranks: int) -> list[str]:
    return ["--standalone", "--nnodes=1", f"--nproc-per-node={ranks}", "--max-restarts=0"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MBL_BACKEND": "local"}
    log = 10
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        prep = spec_file(tmp, "prepare", ["kind=prepare", "train.max_steps=1", "train.warmup_steps=0", "checkpoint.every_steps=1"])
        subprocess.run([sys.executable, "-m", "jobs.launch", "--spec", prep, "--", *torchrun(1)], env=env,
                       check=True, capture_output=True)
        common = [f"data.prepared={tmp / 'prepare'}", f"train.max_steps={args.steps}", "train.warmup_steps=0",
                  f"train.log_every_steps={log}", f"train.eval_every_steps={args.steps}", "train.eval_batches=1",
                  f"checkpoint.every_steps={args.steps}", f"distributed.gpus_per_node={args.ranks}"]
        mbl, bare = [], []
        for i in range(args.runs):
            spec = spec_file(tmp, f"mbl-{i}", common)
            subprocess.run([sys.executable, "-m", "jobs.launch", "--spec", spec, "--", *torchrun(args.ranks)],
                           env=env, check=True, capture_output=True)
            rows = [json.loads(line) for line in open(tmp / f"mbl-{i}" / "metrics.jsonl")]
            rows = [r for r in rows if "split" not in r and "tokens_per_s" in r]
            # wall clock between the first and the last logged step: everything the loop does per step counts
            mbl.append((rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["time"] - rows[0]["time"]))
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", *torchrun(args.ranks),
                                  str(REPO / "bench/overhead_bare.py"), spec, str(args.steps), str(log)],
                                 env=env, check=True, capture_output=True, text=True)
            bare.append(json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"])
            print(f"run {i}: mbl {mbl[-1]:.2f} steps/s, bare {bare[-1]:.2f} steps/s", flush=True)
    m, b = statistics.median(mbl), statistics.median(bare)
    print(f"| loop | steps/s (median of {args.runs}) | runs |\n|---|---|---|")
    print(f"| bare DeepSpeed | {b:.2f} | {', '.join(f'{x:.2f}' for x in bare)} |")
    print(f"| jobs.train | {m:.2f} | {', '.join(f'{x:.2f}' for x in mbl)} |")
    print(f"jobs.train / bare = {m / b:.3f} ({(1 - m / b) * 100:+.1f}% slower)")


if __name__ == "__main__":
    main()
