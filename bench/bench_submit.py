"""Submit-to-running and submit-to-done of a two-node job on the local Slurm cluster: `mbl submit` against
torchx 0.7.0's Slurm scheduler (`torchx run -s slurm dist.ddp -j 2x1`), both running the same training.

    source /tmp/mbl-slurm/env.sh
    python bench/bench_submit.py [--runs 3] [--steps 60] --torchx /tmp/torchx-venv/bin/torchx

The training: examples/pretrain-tiny.yaml on 2 nodes x 1 CPU rank (gloo), `--steps` steps, on data prepared once
beforehand (`kind: prepare`), so that neither job tokenizes. mbl: `mbl submit --cluster slurm` with the dev
cluster's profile (slurm/make_dev_profile.py: the checkout's venv, no container), as a user types it; its script
runs `jobs.launch` (lease, outcome records, requeue on preemption; the node preflight is turned off, as torchx
has none) around torchrun. torchx: `torchx run -s slurm dist.ddp -j 2x1 --cpu 1 --gpu 0 -m jobs.train -- --spec
<the same spec>` from the checkout (torchx's "image" on Slurm is the current directory), the venv's torchrun
first on PATH; its script is a heterogeneous job of two components that runs torchrun with c10d rendezvous. The
two alternate, `--runs` times, each once every node is idle again. Clocks: t0 before the submit command starts
(its own start-up counts); running = the first `squeue` poll (every 0.2 s) that shows every component RUNNING;
done = the first `sacct` poll that shows every component COMPLETED (any other end state aborts the bench). The
trainer's own wall time (summary.json) is reported beside them. torchx's Slurm logs (slurm-<id>*.out/.err,
written in the checkout) are moved into the run's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
POLL = 0.2
COMMON = ["distributed.nodes=2", "distributed.gpus_per_node=1", "resources.cpus_per_gpu=1",
          "resources.mem_per_node=1G", "train.warmup_steps=5", "distributed.preflight=false"]


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


def component_states(job_id: str) -> tuple[list[str], list[str]]:
    """(squeue states, sacct states) of every component of the job (a het job has several)."""
    q = sh("squeue", "-h", "-j", job_id, "-o", "%T").stdout.split()
    a = sh("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State").stdout.split()
    return q, [line.split("|")[1].split()[0] for line in a if "|" in line]


def watch(job_id: str, t0: float, timeout: float = 900) -> tuple[float, float]:
    running = None
    while time.perf_counter() - t0 < timeout:
        q, done = component_states(job_id)
        if running is None and q and all(s == "RUNNING" for s in q):
            running = time.perf_counter() - t0
        if done and all(s not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING") for s in done):
            if any(s != "COMPLETED" for s in done):
                raise SystemExit(f"job {job_id} ended {done}")
            return (running if running is not None else time.perf_counter() - t0), time.perf_counter() - t0
        time.sleep(POLL)
    raise SystemExit(f"job {job_id} not done in {timeout:.0f}s")


def wait_idle(timeout: float = 120) -> None:
    """Until every node of the cluster is idle: the previous job's epilog and cleanup do not count for the next."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        states = sh("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        if states and all(s == "idle" for s in states):
            return
        time.sleep(POLL)
    raise SystemExit(f"the nodes are not idle after {timeout:.0f}s: {states}")


def spec_file(example: str, run: Path, sets: list[str]) -> Path:
    """examples/<example> with `sets`, written into the run directory `run` as the trainer reads it."""
    from launcher.loading import load_spec
    from launcher.rundir import write_spec

    spec = load_spec(REPO / "examples" / example, sets=[f"checkpoint.dir={run}", *sets])
    return write_spec(spec.resolved(REPO))


def wall(run: Path) -> float:
    return float(json.loads((run / "summary.json").read_text())["wall_seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--torchx", default="/tmp/torchx-venv/bin/torchx")
    p.add_argument("--workdir", type=Path, default=None, help="shared by both nodes (default: a temporary folder)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mbl-bench-submit-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MBL_HOME": str(work / "home"), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MBL_PROFILE", None)
    profile = work / "profile.yaml"
    sh(sys.executable, str(REPO / "slurm/make_dev_profile.py"), "-o", str(profile), check=True)

    data_run = work / "prepare"
    prep_spec = spec_file("prepare-tiny.yaml", data_run, ["distributed.gpus_per_node=1"])
    sh(str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "1", "-m", "jobs.train",
       "--spec", str(prep_spec), cwd=REPO, env=env, check=True)
    sets = [*COMMON, f"train.max_steps={args.steps}", f"checkpoint.every_steps={args.steps}",
            f"train.eval_every_steps={args.steps}", "train.eval_batches=1", f"data.prepared={data_run / 'data'}"]

    rows: dict[str, list[tuple[float, float, float]]] = {"mbl": [], "torchx": []}
    for i in range(args.runs):
        for tool in ("mbl", "torchx"):
            name = f"b-{tool}-{i}-{uuid.uuid4().hex[:4]}"
            run = work / "runs" / name
            if tool == "mbl":
                cmd = [sys.executable, "-m", "launcher.cli", "submit", "--cluster", "slurm", "--profile", str(profile),
                       str(REPO / "examples/pretrain-tiny.yaml"), "--set", f"name={name}", "--set", "team=ops",
                       "--set", f"checkpoint.dir={run}", *(x for s in sets for x in ("--set", s))]
            else:
                spec = spec_file("pretrain-tiny.yaml", run, [f"name={name}", *sets])
                cmd = [args.torchx, "run", "-s", "slurm", "dist.ddp", "-j", "2x1", "--cpu", "1", "--gpu", "0",
                       "--memMB", "1024", "-m", "jobs.train", "--", "--spec", str(spec)]
            wait_idle()
            t0 = time.perf_counter()
            proc = sh(*cmd, cwd=REPO if tool == "torchx" else work, env=env)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
            if tool == "mbl":
                out = sh(sys.executable, "-m", "launcher.cli", "status", name, "-o", "json", env=env, cwd=work)
                job_id = json.loads(out.stdout)["job_id"]
            else:
                job_id = re.search(r"slurm://[^/]*/(\d+)", proc.stdout + proc.stderr).group(1)
            running, done = watch(job_id, t0)
            for log in REPO.glob(f"slurm-{job_id}*"):  # torchx's logs land in its "image" (the checkout)
                shutil.move(log, run / log.name)
            trainer = wall(run)
            rows[tool].append((running, done, trainer))
            print(f"{tool} run {i}: job {job_id}: running after {running:.1f} s, done after {done:.1f} s "
                  f"(the trainer's own wall time {trainer:.1f} s)", flush=True)
    med = statistics.median
    report = {}
    for tool, r in rows.items():
        report[tool] = {k: med(x[j] for x in r) for j, k in enumerate(("running_s", "done_s", "trainer_s"))}
        print(f"{tool:7s} median: submit-to-running {report[tool]['running_s']:.1f} s, submit-to-done "
              f"{report[tool]['done_s']:.1f} s, trainer {report[tool]['trainer_s']:.1f} s")
    print(json.dumps({"ratio_running": report["mbl"]["running_s"] / report["torchx"]["running_s"],
                      "ratio_done": report["mbl"]["done_s"] / report["torchx"]["done_s"], **report}))


if __name__ == "__main__":
    main()
