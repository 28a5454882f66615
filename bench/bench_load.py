"""Load on the local Slurm cluster: N jobs through `mbl submit` from P processes at once, then `mbl list`.

    slurm/dev/up.sh && source /tmp/mbl-slurm/env.sh
    .venv/bin/python bench/bench_load.py                       # 200 jobs, 4 at a time, each its own `mbl` process
    .venv/bin/python bench/bench_load.py --mode inprocess      # 4 processes, each running `mbl submit` 50 times
    git archive HEAD~5 | tar -x -C /tmp/old && .venv/bin/python bench/bench_load.py --compare /tmp/old
                                                               # `mbl list` of another checkout on the same jobs

The jobs: examples/pretrain-tiny.yaml, 1 node x 1 GPU, account ops, submitted held (`slurm.sbatch_args.hold=`,
i.e. `sbatch --hold`), so none runs; at the end one `scancel` cancels them all. A registry of its own
($MBL_HOME in a temporary folder). Measured: the submissions' wall time (jobs/s) and each one's latency; the
registry checked (every name once, distinct job ids, squeue's name for each id); `mbl list --limit 1000 -o json`
as a whole process (interpreter start-up included), RUNS times with the jobs pending, then the first call after
the cancel (it records each job's end in the registry) and the calls after it; the squeue and sacct calls of one
`mbl list`, counted by wrappers on PATH. Method and numbers: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MBL = [sys.executable, "-m", "launcher.cli"]

WORKER = r"""
import contextlib, io, json, sys, time
from launcher.cli import cli

first, step, total = (int(x) for x in sys.argv[1:4])
for i in range(first, total, step):
    args = json.loads(sys.argv[4].replace("{i}", f"{i:03d}"))
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(args, prog_name="mbl", standalone_mode=False)
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:
            rc = 99
            err.write(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"rc": rc or 0, "seconds": time.monotonic() - t0, "stderr": err.getvalue()}), flush=True)
"""


def submit_args(work: Path, profile: Path, i: str) -> list[str]:
    name = f"load-{i}"
    return ["submit", "--cluster", "slurm", "--profile", str(profile), str(ROOT / "examples" / "pretrain-tiny.yaml"),
            "--set", f"name={name}", "--set", f"checkpoint.dir={work}/runs/{name}",
            "--set", f"data.train=[{ROOT / 'examples' / 'data' / 'corpus.txt'}]",
            "--set", "team=ops", "--set", "slurm.account=ops", "--set", "slurm.sbatch_args.hold=",
            "--set", "distributed.nodes=1", "--set", "distributed.gpus_per_node=1",
            "--set", "resources.cpus_per_gpu=1", "--set", "resources.mem_per_node=1G"]


def submit_processes(jobs: int, workers: int, work: Path, profile: Path, env: dict) -> list[dict]:
    """Every submission a whole `mbl submit` process, `workers` of them at a time (one thread each)."""
    results: list[dict] = []
    lock = threading.Lock()

    def worker(first: int) -> None:
        for i in range(first, jobs, workers):
            t0 = time.monotonic()
            proc = subprocess.run([*MBL, *submit_args(work, profile, f"{i:03d}")], env=env, cwd=work,
                                  capture_output=True, text=True)
            with lock:
                results.append({"rc": proc.returncode, "seconds": time.monotonic() - t0, "stderr": proc.stderr})

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def submit_inprocess(jobs: int, workers: int, work: Path, profile: Path, env: dict) -> list[dict]:
    """`workers` processes, each running the `mbl submit` command in-process for its share (as tests/test_load.py)."""
    template = json.dumps(submit_args(work, profile, "{i}"))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(workers), str(jobs), template], env=env,
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"a worker failed:\n{err[-3000:]}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_list(env: dict, work: Path) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds of the process and its squeue/sacct, its rows)."""
    cpu, t0 = cpu_of_children(), time.monotonic()
    proc = subprocess.run([*MBL, "list", "--limit", "1000", "-o", "json"], env=env, cwd=work, capture_output=True,
                          text=True)
    seconds = time.monotonic() - t0
    if proc.returncode:
        sys.exit(f"mbl list failed: {proc.stderr}")
    return seconds, cpu_of_children() - cpu, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--mode", choices=["process", "inprocess"], default="process")
    parser.add_argument("--runs", type=int, default=5, help="`mbl list` calls timed with the jobs pending")
    parser.add_argument("--compare", type=Path, default=None, help="also time `mbl list` of this checkout (its "
                        "launcher/ on PYTHONPATH) on the same pending jobs")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine at the start

    work = Path(tempfile.mkdtemp(prefix="mbl-bench-load-"))
    env = dict(os.environ)
    env["MBL_HOME"] = str(work / "home")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MBL_QUOTA_POLICY", None)
    profile = work / "profile.yaml"
    subprocess.run([sys.executable, str(ROOT / "slurm" / "make_dev_profile.py"), "-o", str(profile)], check=True)
    ids: list[str] = []
    try:
        submit = submit_processes if args.mode == "process" else submit_inprocess
        cpu, t0 = cpu_of_children(), time.monotonic()
        results = submit(args.jobs, args.workers, work, profile, env)
        wall, submit_cpu = time.monotonic() - t0, cpu_of_children() - cpu
        bad = [r for r in results if r["rc"] or "database is locked" in r["stderr"]]
        if bad or len(results) != args.jobs:
            sys.exit(f"{len(bad)} submissions failed, {len(results)} of {args.jobs} reported: {bad[:2]}")

        db = sqlite3.connect(work / "home" / "registry.db")
        rows = db.execute("SELECT name, job_id FROM jobs").fetchall()
        db.close()
        ids = [job_id for _n, job_id in rows]
        names = sorted(n for n, _j in rows)
        assert names == [f"load-{i:03d}" for i in range(args.jobs)], "lost or duplicated registry rows"
        assert len(set(ids)) == args.jobs, "duplicated job ids"
        out = subprocess.run(["squeue", "--noheader", "--jobs", ",".join(ids), "-O", "JobID:|,Name:|"], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert dict(line.split("|")[:2] for line in out.splitlines() if line.strip()) == {j: n for n, j in rows}

        calls = work / "calls.log"
        wrappers = work / "bin"
        wrappers.mkdir()
        for tool in ("squeue", "sacct"):
            (wrappers / tool).write_text(f'#!/bin/sh\necho {tool} >> {calls}\nexec {shutil.which(tool)} "$@"\n')
            (wrappers / tool).chmod(0o755)
        counted = {**env, "PATH": f"{wrappers}:{env['PATH']}"}
        pending, pending_cpu = [], []
        for _ in range(args.runs):
            seconds, cpu, listed = time_list(counted, work)
            assert len(listed) == args.jobs and {r["state"] for r in listed} == {"PENDING"}
            pending.append(seconds)
            pending_cpu.append(cpu)
        per_call = calls.read_text().split()
        other, other_calls = [], []
        if args.compare:
            calls.unlink()
            compared = {**counted, "PYTHONPATH": str(args.compare.resolve())}
            for _ in range(args.runs):
                seconds, cpu, listed = time_list(compared, work)
                assert len(listed) == args.jobs
                other.append((seconds, cpu))
            other_calls = calls.read_text().split()
        subprocess.run(["scancel", *ids], env=env, check=True)
        ids = []
        after = []
        for _ in range(3):
            seconds, _cpu, listed = time_list(env, work)
            after.append(seconds)
        assert {r["state"] for r in listed} == {"CANCELLED"}, {r["state"] for r in listed}

        lat = sorted(r["seconds"] for r in results)
        print(f"{args.jobs} jobs, {args.workers} at a time, mode {args.mode}, on {os.cpu_count()} cores, "
              f"load average at the start: {load:.1f}")
        print("| measure | value |\n|---|---|")
        print(f"| submit: wall time | {wall:.1f} s ({args.jobs / wall:.1f} jobs/s) |")
        print(f"| submit: latency of one, median / p95 / max | {lat[len(lat) // 2]:.2f} / "
              f"{lat[int(len(lat) * 0.95)]:.2f} / {lat[-1]:.2f} s |")
        print(f"| submit: CPU time (user + system, with sbatch) per job | {submit_cpu / args.jobs:.3f} s |")
        print("| registry | {} rows, {} distinct names, {} distinct job ids, 0 \"database is locked\" |".format(
            len(rows), len(set(names)), len(set(ids or [j for _n, j in rows]))))
        print(f"| `mbl list` of {args.jobs} pending jobs, median (min - max) of {args.runs} | "
              f"{statistics.median(pending):.2f} s ({min(pending):.2f} - {max(pending):.2f}) |")
        print(f"| `mbl list` of {args.jobs} pending jobs: CPU time, median | {statistics.median(pending_cpu):.2f} s |")
        print(f"| squeue / sacct calls per `mbl list` | {per_call.count('squeue') / args.runs:g} / "
              f"{per_call.count('sacct') / args.runs:g} |")
        print(f"| `mbl list` after the cancel: first (records {args.jobs} ends) / then | {after[0]:.2f} s / "
              f"{statistics.median(after[1:]):.2f} s |")
        if other:
            print(f"| {args.compare}: `mbl list` of {args.jobs} pending jobs, median wall / CPU | "
                  f"{statistics.median(s for s, _c in other):.2f} s / {statistics.median(c for _s, c in other):.2f} s, "
                  f"{other_calls.count('squeue') / args.runs:g} squeue and {other_calls.count('sacct') / args.runs:g} "
                  "sacct calls |")
    finally:
        if ids:
            subprocess.run(["scancel", *ids], env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
