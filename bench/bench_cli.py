"""CLI start-up benchmark: `mbl render --cluster slurm examples/pretrain.yaml` vs torchx 0.7.0's Slurm dry-run,
and `mbl validate` / `mbl render` (Slurm and Kubernetes) of the same spec at 1 and at 128 nodes.

Whole processes, median of N runs each, interleaved on the same machine. Also checks with
`python -X importtime` that the `mbl` entry point imports no torch, transformers or deepspeed.

    python bench/bench_cli.py [--runs 5] [--torchx /path/to/venv-with-torchx/bin/torchx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "datasets", "kubernetes")


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--torchx", default=None, help="torchx executable (0.7.0) to compare against")
    args = parser.parse_args()

    mbl = [sys.executable, "-m", "launcher.cli", "render", "--cluster", "slurm", "examples/pretrain.yaml"]
    results: dict[str, list[float]] = {"mbl render --cluster slurm": []}
    cli = [sys.executable, "-m", "launcher.cli"]
    n128 = ["--set", "distributed.nodes=128", "--set", "train.global_batch_size=24576"]
    scale = {  # 1 node vs 128 nodes: what a render costs as the job grows
        "mbl validate (1 node)": [*cli, "validate", "examples/pretrain.yaml", "--set", "distributed.nodes=1"],
        "mbl validate (128 nodes)": [*cli, "validate", "examples/pretrain.yaml", *n128],
        "mbl render --cluster slurm (128 nodes)": [*mbl, *n128],
        "mbl render --k8s (1 node)": [*cli, "render", "--k8s", "examples/pretrain.yaml", "--set", "distributed.nodes=1"],
        "mbl render --k8s (128 nodes)": [*cli, "render", "--k8s", "examples/pretrain.yaml", *n128],
    }
    results.update({name: [] for name in scale})
    torchx_cmd = None
    scratch = Path(tempfile.mkdtemp())
    if args.torchx:
        (scratch / "train.py").write_text("print('hi')\n")
        torchx_cmd = [args.torchx, "run", "-s", "slurm", "--dryrun", "dist.ddp", "-j", "2x1", "--script", "train.py"]
        results["torchx run -s slurm --dryrun"] = []
    timed(mbl, REPO)  # warm the page cache once
    for _ in range(args.runs):
        results["mbl render --cluster slurm"].append(timed(mbl, REPO))
        for name, cmd in scale.items():
            results[name].append(timed(cmd, REPO))
        if torchx_cmd:
            results["torchx run -s slurm --dryrun"].append(timed(torchx_cmd, scratch))
    for name, times in results.items():
        print(f"{name:40s} median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f}, "
              f"n={len(times)})")

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher.cli", "render", "--cluster", "slurm",
                           "examples/pretrain.yaml"], cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    heavy = sorted(set(HEAVY) & imported)
    print(f"importtime: {len(imported)} top-level modules; heavy imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
