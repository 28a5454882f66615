"""Load on the real local Slurm cluster: 200 jobs submitted through `mbl submit` from 4 processes at once.

The jobs are cheap for real: each is examples/pretrain-tiny.yaml (1 node x 1 GPU, account ops) submitted held
(`slurm.sbatch_args.hold=`, i.e. `sbatch --hold`), so none of them ever starts; at the end one `scancel`
cancels them all. Each of the 4 worker processes runs the `mbl submit` command in-process 50 times (the same
click command and code path as the `mbl` executable, without 200 interpreter start-ups on 2 cores), each
submission with its own registry connection, all four writing the one SQLite registry at the same time.

Asserted: every submission succeeded and nothing said "database is locked"; the registry holds exactly the 200
names, once each, with 200 distinct job ids, and squeue knows each id under that name; `mbl list` answers for
all of them in one call, with one squeue call (and one sacct call for the jobs squeue does not list). Its time
is printed, not asserted: the goal (under 2 s) and the measurements are in bench/README.md
(bench/bench_load.py).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_util import MBL, ROOT, mbl

from launcher.backends.base import JobRef
from launcher.registry import Registry

pytestmark = pytest.mark.slurm

JOBS, WORKERS = 200, 4

# One worker: `mbl submit` of every WORKERS-th job, in this process; a JSON line per submission on stdout.
WORKER = r"""
import contextlib, io, json, sys, time
from launcher.cli import cli

first, step, total, work, profile, corpus, spec = sys.argv[1:8]
for i in range(int(first), int(total), int(step)):
    name = f"load-{i:03d}"
    args = ["submit", "--cluster", "slurm", "--profile", profile, spec, "--set", f"name={name}",
            "--set", f"checkpoint.dir={work}/runs/{name}", "--set", f"data.train=[{corpus}]",
            "--set", "team=ops", "--set", "slurm.account=ops", "--set", "slurm.sbatch_args.hold=",
            "--set", "distributed.nodes=1", "--set", "distributed.gpus_per_node=1",
            "--set", "resources.cpus_per_gpu=1", "--set", "resources.mem_per_node=1G"]
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(args, prog_name="mbl", standalone_mode=False)
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:  # a traceback is a failure of the test, reported with the rest
            rc = 99
            err.write(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"name": name, "rc": rc or 0, "seconds": time.monotonic() - t0, "stderr": err.getvalue()}),
          flush=True)
"""


@pytest.fixture
def counted(cluster: dict, tmp_path: Path) -> Path:
    """squeue and sacct behind wrappers that log each call: the file they log to."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):
        real = shutil.which(tool, path=cluster["env"]["PATH"])
        assert real, f"{tool} not on PATH"
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return log


def test_200_submissions_from_4_processes_keep_the_registry_consistent(cluster: dict, counted: Path) -> None:
    work = cluster["work"]
    cmd = [sys.executable, "-c", WORKER]
    common = [str(WORKERS), str(JOBS), str(work), str(cluster["profile"]),
              str(ROOT / "examples" / "data" / "corpus.txt"), str(ROOT / "examples" / "pretrain-tiny.yaml")]
    ids: list[str] = []
    try:
        t0 = time.monotonic()
        procs = [subprocess.Popen([*cmd, str(w), *common], env=cluster["env"], cwd=work, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for w in range(WORKERS)]
        outs = [p.communicate(timeout=600) for p in procs]
        elapsed = time.monotonic() - t0
        results = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
        for proc, (_out, err) in zip(procs, outs):
            assert proc.returncode == 0, err[-3000:]
            assert "database is locked" not in err, err[-3000:]
        failed = [r for r in results if r["rc"] != 0 or "database is locked" in r["stderr"]]
        assert not failed, failed[:3]
        assert len(results) == JOBS

        # The registry: every name once, distinct job ids; squeue agrees on each id's name; all held.
        db = sqlite3.connect(Path(cluster["env"]["MBL_HOME"]) / "registry.db")
        rows = db.execute("SELECT name, job_id, backend FROM jobs WHERE name LIKE 'load-%'").fetchall()
        db.close()
        ids = [job_id for _name, job_id, _b in rows]
        assert sorted(name for name, _j, _b in rows) == [f"load-{i:03d}" for i in range(JOBS)]
        assert len(set(ids)) == JOBS and {b for _n, _j, b in rows} == {"slurm"}
        out = subprocess.run(["squeue", "--noheader", "--jobs", ",".join(ids), "-O", "JobID:|,Name:|,Reason:|"],
                             env=cluster["env"], capture_output=True, text=True, check=True).stdout
        queued = {line.split("|")[0]: line.split("|")[1:3] for line in out.splitlines() if line.strip()}
        assert {job_id: [name, "JobHeldUser"] for name, job_id, _b in rows} == queued

        # Two records of jobs slurmctld has forgotten: only sacct is asked about them, in the same one call.
        registry = Registry(Path(cluster["env"]["MBL_HOME"]) / "registry.db")
        for n in range(2):
            registry.add(JobRef("slurm", str(999990 + n), f"gone-{n}", str(work / "runs" / f"gone-{n}"), {}))
        registry.close()

        env = {**cluster["env"], "PATH": f"{counted.parent / 'bin'}:{cluster['env']['PATH']}"}
        t1 = time.monotonic()
        listed = subprocess.run([*MBL, "list", "--limit", "1000", "-o", "json"], env=env, cwd=work,
                                capture_output=True, text=True, timeout=120)
        list_seconds = time.monotonic() - t1
        assert listed.returncode == 0, listed.stderr
        states = {r["name"]: (r["job_id"], r["state"]) for r in json.loads(listed.stdout)}
        assert {n: states[n] for n, _j, _b in rows} == {n: (j, "PENDING") for n, j, _b in rows}
        assert states["gone-0"][1] == states["gone-1"][1] == "UNKNOWN"
        calls = counted.read_text().splitlines()
        assert [c.split()[0] for c in calls] == ["squeue", "sacct"], calls
        assert sorted(calls[1].split("--jobs ")[1].split()[0].split(",")) == ["999990", "999991"], calls
        print(f"\nload: {JOBS} submissions from {WORKERS} processes in {elapsed:.1f}s ({JOBS / elapsed:.1f} jobs/s, "
              f"median {sorted(r['seconds'] for r in results)[JOBS // 2]:.3f}s each); "
              f"mbl list of {len(states)} jobs in {list_seconds:.2f}s")
    finally:
        if ids:
            subprocess.run(["scancel", *ids], env=cluster["env"], check=False)
    out = mbl(cluster, "list", "--limit", "1000", "-o", "json").stdout
    assert {r["state"] for r in json.loads(out) if r["name"].startswith("load-")} == {"CANCELLED"}
