"""One writer per run directory: the trainer's lease (jobs/lease.py) and the launcher's refusal (launcher/rundir.py).

The lease is plain files, so these tests use real processes and threads on a real directory; the end-to-end
case (two trainers started by hand on one run directory) is in test_jobs_train.py.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from jobs.lease import Lease, LeaseError
from launcher import contract
from launcher.errors import UsageError
from launcher.loading import load_spec
from launcher.rundir import current_lease, refuse_live_writer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def as_job(monkeypatch: pytest.MonkeyPatch):
    def set_job(job: str, attempt: int = 0) -> None:
        monkeypatch.setenv("MBL_JOB_ID", job)
        monkeypatch.setenv("MBL_ATTEMPT", str(attempt))
    return set_job


def test_a_second_job_is_refused_while_the_first_heartbeats(tmp_path: Path, as_job, monkeypatch) -> None:
    monkeypatch.setenv("MBL_LEASE_TTL", "2")
    as_job("101")
    first = Lease(tmp_path)
    assert first.acquire() == ""
    as_job("202")
    time.sleep(3)  # longer than the ttl: only the heartbeat (every ttl/4) keeps the lease fresh
    with pytest.raises(LeaseError) as refused:
        Lease(tmp_path).acquire()
    assert "job 101" in str(refused.value) and "mbl cancel" in refused.value.hint
    first.check()  # still the holder
    first.release()
    assert current_lease(tmp_path) is None
    second = Lease(tmp_path)
    assert second.acquire() == ""  # free again
    second.release()


def test_a_requeued_attempt_takes_over_its_own_lease_at_once(tmp_path: Path, as_job, monkeypatch) -> None:
    monkeypatch.setenv("MBL_LEASE_TTL", "600")
    as_job("303", 0)
    old = Lease(tmp_path)
    old.acquire()
    as_job("303", 1)
    new = Lease(tmp_path)
    assert "attempt 0 of this job" in new.acquire()
    with pytest.raises(LeaseError, match="lost the lease"):
        old.check()  # the old attempt, if it still ran, must not commit a checkpoint
    assert current_lease(tmp_path)[1]["attempt"] == 1
    old.release()  # releasing a lost lease removes nothing
    assert current_lease(tmp_path)[1]["attempt"] == 1
    new.release()


def test_a_stale_lease_is_taken_over(tmp_path: Path, as_job, monkeypatch) -> None:
    monkeypatch.setenv("MBL_LEASE_TTL", "1")
    as_job("404")
    dead = Lease(tmp_path)
    dead.acquire()
    dead._stop.set()  # the holder was SIGKILLed: no more heartbeats
    dead._thread.join()
    as_job("505")
    with pytest.raises(LeaseError):
        Lease(tmp_path).acquire()  # still fresh
    time.sleep(1.5)
    taker = Lease(tmp_path)
    assert "took over a stale lease: job 404" in taker.acquire()
    taker.release()


def _race(run_dir: str, job: str, start: float, out) -> None:
    os.environ["MBL_JOB_ID"], os.environ["MBL_LEASE_TTL"] = job, "600"
    while time.time() < start:
        pass
    try:
        Lease(Path(run_dir)).acquire()
        out.put((job, "won"))
        time.sleep(2)  # hold it while the others look
    except LeaseError:
        out.put((job, "refused"))


def test_of_many_trainers_starting_at_once_exactly_one_gets_the_lease(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_race, args=(str(tmp_path), f"job-{i}", start, out)) for i in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(r for _, r in results).count("won") == 1, results


def test_submit_is_refused_while_a_fresh_lease_is_held(tmp_path: Path, as_job, monkeypatch) -> None:
    from launcher.registry import Registry

    monkeypatch.setenv("MBL_LEASE_TTL", "600")
    spec = load_spec(REPO / "examples" / "pretrain-tiny.yaml", [f"checkpoint.dir={tmp_path}"]).resolved()
    registry = Registry(tmp_path / "registry.db")
    refuse_live_writer(spec, registry, lambda name: None)  # nothing there: accepted
    as_job("606")
    lease = Lease(tmp_path)
    lease.acquire()  # another user's job, say: not in this registry
    with pytest.raises(UsageError, match="being written by job 606"):
        refuse_live_writer(spec, registry, lambda name: None)
    lease.release()
    refuse_live_writer(spec, registry, lambda name: None)
    assert not (tmp_path / contract.LEASE_DIR / "gen-00000001.json").exists()


@pytest.mark.slow
def test_two_trainers_by_hand_the_second_exits_without_touching_checkpoints(tmp_path: Path) -> None:
    """Two `torchrun -m jobs.train` on one run directory: the second stops at once with the holder's name."""
    import json
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    spec = load_spec(REPO / "examples" / "pretrain-tiny.yaml", [
        f"checkpoint.dir={run_dir}", "distributed.gpus_per_node=1", "train.global_batch_size=16",
        "train.max_steps=20000", "checkpoint.every_steps=20000", "train.eval_every_steps=20000"]).resolved(REPO)
    run_dir.mkdir(parents=True)
    spec_file = run_dir / contract.SPEC_FILE
    spec_file.write_text(spec.to_yaml())
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=1",
                "-m", "jobs.train", "--spec", str(spec_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MBL_JOB_ID", None)
    first = subprocess.Popen(torchrun, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / contract.METRICS_FILE).exists():  # training: it holds the lease
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.5)
        holder = current_lease(run_dir)[1]

        def tree() -> dict[str, int]:  # the first one saves nothing before the end (every_steps = max_steps)
            ckpt = run_dir / contract.CHECKPOINTS_DIR
            return {str(p.relative_to(ckpt)): p.stat().st_mtime_ns for p in [ckpt, *ckpt.rglob("*")]}

        before = tree()
        second = subprocess.run(torchrun, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        after = tree()
        assert second.returncode != 0
        out = second.stdout + second.stderr
        assert f"is being written by job {holder['job']}" in out, out[-3000:]
        assert after == before  # not a file added, removed or rewritten
        assert current_lease(run_dir)[1]["job"] == holder["job"]
        metrics = [json.loads(x) for x in (run_dir / contract.METRICS_FILE).read_text().splitlines()]
        assert first.poll() is None and metrics  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=180)
    assert current_lease(run_dir) is None  # released on the way out
