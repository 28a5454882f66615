"""Checkpoints under faults, on the CPU with two ranks (DeepSpeed, gloo): kill -9 of the whole job at every
named point inside a save, a full disk during a save, refused resumes, and retention.

Every job here is a few steps of the tiny model on data prepared once, in process. Jobs that are killed or
must show each rank's exit code start their ranks directly, as one process group of their own, so that a
rank at a fault point can SIGKILL the whole job at once (torchrun gives each worker a session of its own);
the others run under torchrun.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.checkpoint import (
    DEL_PREFIX,
    FAULT_POINTS,
    MANIFEST_FILE,
    STATE_FILE,
    TMP_PREFIX,
    Checkpointer,
    step_name,
    verify,
    write_file,
)
from jobs.data import file_sha256
from launcher import contract
from launcher.loading import load_spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every_steps=1",
        "train.eval_every_steps=1000", "train.eval_batches=1", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from jobs import data as D

    out = tmp_path_factory.mktemp("prepared") / "data"
    spec = load_spec(REPO / "examples/pretrain-tiny.yaml", sets=[f"checkpoint.dir={out.parent}"]).resolved(REPO)
    D.prepare(spec, out, log=lambda m: None)
    return out


def write_spec(run_dir: Path, prepared: Path, *sets: str) -> Path:
    spec = load_spec(REPO / "examples/pretrain-tiny.yaml",
                     sets=[f"checkpoint.dir={run_dir}", f"data.prepared={prepared}", *FAST, *sets]).resolved(REPO)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / contract.SPEC_FILE
    path.write_text(spec.to_yaml())
    return path


def torchrun(spec: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "jobs.train", "--spec",
           str(spec)]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)


def start(spec: Path, logs: Path, env: dict | None = None, world: int = 2) -> tuple[list, list[Path]]:
    """The ranks as one job in a process group of its own; returns the processes and their log files."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, files = [], []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", **(env or {})}
        files.append(logs.with_name(f"{logs.name}-rank{rank}.log"))
        with open(files[-1], "w") as out:
            group = procs[0].pid if procs else 0  # a process group of their own: rank 0 leads it
            procs.append(subprocess.Popen([sys.executable, "-m", "jobs.train", "--spec", str(spec)], cwd=REPO,
                                          env=e, stdout=out, stderr=subprocess.STDOUT, process_group=group))
    return procs, files


def job(spec: Path, logs: Path, env: dict | None = None, world: int = 2) -> tuple[list[int], list[str]]:
    """The ranks as one job in a process group of its own; returns each rank's exit code and output."""
    procs, files = start(spec, logs, env, world)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [f.read_text() for f in files]


def mbl_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "[mbl]" in line or "rror" in line or "warning" in line)


def checkpoints(run: Path) -> dict[int, str | None]:
    """step -> None if it verifies, else what is wrong; complete checkpoint folders only."""
    ckpt = Checkpointer(run, None, 0, 1)
    return {int(p.name[5:]): verify(p) for p in ckpt.complete()}


def latest(run: Path) -> str:
    return (run / contract.LATEST_FILE).read_text().strip()


def losses(run: Path) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for line in (run / contract.METRICS_FILE).read_text().splitlines():
        row = json.loads(line)
        if "split" not in row:
            out.setdefault(row["step"], set()).add(row["loss"])
    return out


# ---- kill -9 inside a save ----------------------------------------------------------------------------

# The save of step N is cut at `point`; a restart must then resume from the checkpoint named here.
AFTER_RENAME = ("retention",)  # `latest` already names step N


@pytest.mark.slow
def test_kill9_at_every_point_inside_a_save_resumes_from_a_complete_checkpoint(prepared, tmp_path):
    """One run, killed once per point: each launch resumes, saves step R+1, and is killed (the whole job:
    both ranks, SIGKILL) inside the save of step R+2 at the next point. Each restart must resume from a
    complete checkpoint that verifies, and replayed steps must give the same loss bit for bit."""
    run = tmp_path / "run"
    points = list(FAULT_POINTS)
    assert len(points) >= 10
    spec = write_spec(run, prepared, f"train.max_steps={2 * len(points) + 4}")
    resumed = 0
    for i, point in enumerate(points):
        target = resumed + 2
        rank = 1 if point in ("deepspeed-file", "rank-state") else 0  # a rank-1 write is cut too
        codes, outs = job(spec, tmp_path / f"launch{i}", env={
            "MBL_FAULT_AT": f"{point}@{target}", "MBL_FAULT_RANK": str(rank), "MBL_FAULT_KILL": "group"})
        assert codes == [-9, -9], (point, codes, mbl_lines(outs[0]), outs[1][-3000:])
        assert f"MBL_FAULT_AT: SIGKILL at {point} of step {target}" in outs[rank], mbl_lines(outs[rank])
        if resumed:
            assert f"resumed from checkpoints/{step_name(resumed)} at step {resumed}" in outs[0], mbl_lines(outs[0])
        else:
            assert "resumed from" not in outs[0]
        assert "Traceback" not in outs[0] + outs[1], (point, outs)

        if point == "marker":  # a COMPLETE marker inside a temporary folder: it must not count
            assert (run / contract.CHECKPOINTS_DIR / (TMP_PREFIX + step_name(target)) / contract.COMPLETE_MARKER).exists()
        found = checkpoints(run)
        assert all(problem is None for problem in found.values()), (point, found)  # complete ones all verify
        expected = target if point in AFTER_RENAME else target - 1
        assert (target in found) == (point in ("renamed", "latest", *AFTER_RENAME)), (point, sorted(found))
        assert latest(run) == f"checkpoints/{step_name(expected)}", point
        resumed = expected

    assert (run / contract.CHECKPOINTS_DIR / (DEL_PREFIX + step_name(resumed - 2))).exists()  # retention's cut
    proc = torchrun(spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from checkpoints/{step_name(resumed)}" in proc.stdout, mbl_lines(proc.stdout)
    assert (run / contract.DONE_FILE).exists()
    replayed = {step: seen for step, seen in losses(run).items()}
    assert all(len(seen) == 1 for seen in replayed.values()), replayed  # a step run twice gives the same loss
    names = sorted(p.name for p in (run / contract.CHECKPOINTS_DIR).iterdir() if p.is_dir())
    total = 2 * len(points) + 4
    assert names == [step_name(total - 2), step_name(total - 1)], names  # keep_last 2; leftovers cleaned up


# ---- a slow save ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slow_save_is_finished_after_sigterm(prepared, tmp_path):
    """MBL_FAULT_SAVE_DELAY: rank 1 sleeps 6 s inside the save of step 2. SIGTERM to both ranks during that sleep
    (what torchrun forwards) does not cut the save short: it completes on both ranks, they agree to stop at the
    next step boundary (step 3: the stop flag is read a boundary after it starts), save it and exit 75; `latest`
    names step 3, and both checkpoints verify."""
    run = tmp_path / "run"
    spec = write_spec(run, prepared, "train.max_steps=50", "checkpoint.every_steps=2")
    procs, files = start(spec, tmp_path / "slow", env={"MBL_FAULT_SAVE_DELAY": "6@2", "MBL_FAULT_RANK": "1"})
    try:
        deadline = time.time() + 240
        while "MBL_FAULT_SAVE_DELAY: rank 1 sleeps 6s inside the save of step 2" not in files[1].read_text():
            alive = all(p.poll() is None for p in procs)
            assert time.time() < deadline and alive, [f.read_text()[-3000:] for f in files]
            time.sleep(0.1)
        signalled = time.time()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
        waited = time.time() - signalled
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [f.read_text() for f in files]
    assert codes == [contract.REQUEUE_EXIT_CODE] * 2, (codes, mbl_lines(outs[0]), outs[1][-3000:])
    assert "MBL_FAULT_SAVE_DELAY: rank 1 goes on with the save of step 2" in outs[1]
    saved = re.search(r"checkpoint step 2 saved in ([0-9.]+)s", outs[0])
    assert saved and float(saved.group(1)) >= 6.0, mbl_lines(outs[0])
    assert waited > 3.0  # the ranks were signalled inside the sleep, and kept saving
    assert "stopping at step 3: signal SIGTERM" in outs[0], mbl_lines(outs[0])
    assert latest(run) == "checkpoints/step-00000003" and checkpoints(run) == {2: None, 3: None}


@pytest.mark.slow
def test_a_stop_signal_during_a_background_write_exits_only_once_both_saves_are_durable(prepared, tmp_path):
    """Rank 1's background write of step 4 sleeps 4 s while training goes on; SIGTERM to both ranks in that
    sleep. They stop at the next step boundary, wait for the write of step 4, save their step blocking, and exit
    75 with that step `latest`, both checkpoints complete and verified."""
    run = tmp_path / "run"
    spec = write_spec(run, prepared, "train.max_steps=50", "checkpoint.every_steps=4")
    procs, files = start(spec, tmp_path / "stop", env={"MBL_FAULT_WRITE_DELAY": "4@4", "MBL_FAULT_RANK": "1"})
    try:
        deadline = time.time() + 240
        while "MBL_FAULT_WRITE_DELAY: rank 1 sleeps 4s inside the background write of step 4" not in files[1].read_text():
            alive = all(p.poll() is None for p in procs)
            assert time.time() < deadline and alive, [f.read_text()[-3000:] for f in files]
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [f.read_text() for f in files]
    assert codes == [contract.REQUEUE_EXIT_CODE] * 2, (codes, mbl_lines(outs[0]), outs[1][-3000:])
    stopped = int(re.search(r"stopping at step (\d+): signal SIGTERM", outs[0]).group(1))
    assert stopped > 4 and max(losses(run)) == stopped  # trained on during the write; the last step is saved
    background = re.search(r"checkpoint step 4 saved in ([0-9.]+)s \(written in the background", outs[0])
    assert background and float(background.group(1)) >= 4.0, mbl_lines(outs[0])
    assert outs[0].index("checkpoint step 4 saved") < outs[0].index(f"checkpoint step {stopped} saved")
    assert latest(run) == f"checkpoints/{step_name(stopped)}" and checkpoints(run) == {4: None, stopped: None}


def test_save_delay_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MBL_FAULT_SAVE_DELAY", "soon")
    with pytest.raises(ValueError, match=r"MBL_FAULT_SAVE_DELAY='soon': expected <seconds>\[@<step>\]"):
        Checkpointer(tmp_path, None, 0, 1)


# ---- a full disk --------------------------------------------------------------------------------------


def checkpoint_bytes(spec_path: Path, prepared: Path) -> int:
    """What one checkpoint of the tiny model takes: ZeRO-1, fp32, AdamW: 4 bytes of weights and 12 of
    optimizer state (master copy, two moments) per parameter."""
    from jobs.model import pretrain_model

    index = json.loads((prepared / "index.json").read_text())
    model = pretrain_model(load_spec(spec_path), index["vocab_size"], index["special_ids"])
    return 16 * sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(prepared, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run = tmp_path / "run"
    run.mkdir()
    spec = write_spec(tmp_path / "probe", prepared, "train.max_steps=8", "checkpoint.every_steps=2",
                      "checkpoint.keep_last=1")
    size = int(1.5 * checkpoint_bytes(spec, prepared))  # the first checkpoint fits, a second one beside it not
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(run)], check=True)
    try:
        spec = write_spec(run, prepared, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=1")
        codes, outs = job(spec, tmp_path / "full")
        assert codes == [1, 1], (codes, outs)
        for out in outs:
            assert "Traceback" not in out, out
            error = out[out.index("error: "):]
            assert error.startswith("error: checkpoint step-00000004 could not be written: rank "), error
            assert "no space left on device (ENOSPC) writing checkpoints/.tmp-step-00000004/" in error, error
            assert re.search(rf"free of [0-9.]+ MB on the file system of {run}/checkpoints", error), error
            assert re.search(r"checkpoints/step-00000002 is intact and still `latest` \(a checkpoint of this run "
                             r"takes [0-9.]+ MB\)", error), error
            assert ("fix: free space on that file system (or raise the quota), lower checkpoint.keep_last, or "
                    "point checkpoint.dir at a larger volume; then start the job again: it resumes from "
                    "checkpoints/step-00000002") in error, error
        assert latest(run) == "checkpoints/step-00000002"
        assert checkpoints(run) == {2: None}
        assert not [p for p in (run / contract.CHECKPOINTS_DIR).iterdir() if p.name.startswith(TMP_PREFIX)]

        # The fix works: more room, the same job again resumes from step 2 and finishes.
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(run)], check=True)
        proc = torchrun(spec)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "resumed from checkpoints/step-00000002 at step 2" in proc.stdout, mbl_lines(proc.stdout)
    finally:
        subprocess.run(["umount", "-l", str(run)], check=False)


# ---- refused resumes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_a_changed_spec_and_converts_another_world_size(prepared, tmp_path):
    run = tmp_path / "run"
    spec = write_spec(run, prepared, "train.max_steps=2")
    proc = torchrun(spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run / contract.DONE_FILE).unlink()  # as if it had stopped after the step-1 checkpoint
    assert latest(run) == "checkpoints/step-00000001"

    for change in ("train.lr=0.001", "train.global_batch_size=16"):  # the numbers change: refused
        write_spec(run, prepared, "train.max_steps=2", change)
        codes, outs = job(spec, tmp_path / change.split("=")[0])
        assert codes == [2, 2], (change, codes, outs)
        assert f"error: {run}/checkpoints/step-00000001 was written by a spec with training fingerprint" in outs[0]
        assert "fix: restore the original spec, or start a new run" in outs[0]
        assert "Traceback" not in outs[0] + outs[1]

    # Another world size with the same global batch (the micro batch accumulates twice): the partitioned ZeRO
    # state is converted, and the checkpoint it came from is left as it was.
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints/step-00000001").iterdir()}
    write_spec(run, prepared, "train.max_steps=2", "distributed.gpus_per_node=1")
    codes, outs = job(spec, tmp_path / "world", world=1)
    assert codes == [0], (codes, outs)
    assert "resharded checkpoints/step-00000001 from 2 to 1 ranks: converted to DeepSpeed's universal " in outs[0]
    assert "resumed from checkpoints/step-00000001 at step 1" in outs[0], mbl_lines(outs[0])
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints/step-00000001").iterdir()} == before
    assert not [p for p in (run / contract.CHECKPOINTS_DIR).iterdir() if "universal" in p.name]
    assert (run / contract.DONE_FILE).exists()


# ---- retention (no training) --------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, metric: float, best_step: int, complete: bool = True) -> Path:
    folder = root / contract.CHECKPOINTS_DIR / step_name(step)
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "metric": metric, "best_step": best_step}))
    (folder / "weights.pt").write_bytes(os.urandom(64))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())}
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}))
    if complete:
        (folder / contract.COMPLETE_MARKER).write_text("ok\n")
    return folder


def test_retention_keeps_last_and_best_and_never_leaves_the_run_dir(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"keep me")
    (outside / contract.COMPLETE_MARKER).write_text("ok\n")  # looks like a checkpoint through a symlink
    ckpt = Checkpointer(run, SimpleNamespace(checkpoint=SimpleNamespace(keep_last=2)), 0, 1, log=lambda m: None)
    for step, metric in ((1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3)):
        fake_checkpoint(run, step, metric, best_step=1)
    assert all(verify(p) is None for p in ckpt.complete())
    newer = fake_checkpoint(run, 5, 0.2, best_step=1, complete=False)  # a save in flight: not complete yet
    (ckpt.dir / step_name(0)).symlink_to(outside, target_is_directory=True)
    (ckpt.dir / step_name(2) / "link").symlink_to(outside / "precious.bin")
    (ckpt.dir / (TMP_PREFIX + step_name(3))).mkdir()  # a save killed earlier
    (ckpt.dir / (DEL_PREFIX + step_name(1))).mkdir()  # a deletion killed earlier

    ckpt.retain(4)
    names = sorted(p.name for p in ckpt.dir.iterdir())
    # keep_last 2 (steps 3, 4) + the best (step 1); step 5 is not complete, so step 3 stays; leftovers gone
    assert names == [step_name(i) for i in (0, 1, 3, 4, 5)], names
    assert (outside / "precious.bin").read_bytes() == b"keep me"  # the link inside step 2 was not followed
    assert (ckpt.dir / step_name(0)).is_symlink() and (outside / contract.COMPLETE_MARKER).exists()

    (newer / contract.COMPLETE_MARKER).write_text("ok\n")  # step 5 complete: now step 3 may go
    ckpt.retain(5)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == [step_name(i) for i in (0, 1, 4, 5)]
    assert sorted(p.name for p in outside.iterdir()) == [contract.COMPLETE_MARKER, "precious.bin"]

    # A checkpoint after the step being saved (a run resumed from an earlier `latest`) is not counted.
    fake_checkpoint(run, 9, 0.9, best_step=1)
    ckpt.retain(5)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == [step_name(i) for i in (0, 1, 4, 5, 9)]
    with pytest.raises(ValueError, match="not inside"):
        ckpt._remove(outside)


def test_fault_points_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MBL_FAULT_AT", "rename@3")
    with pytest.raises(ValueError, match="unknown point 'rename'; points: begin, deepspeed-file"):
        Checkpointer(tmp_path, None, 1, 2)


def test_write_file_hashes_while_writing(tmp_path):
    import torch

    path = tmp_path / "t.pt"
    info = write_file(path, lambda f: torch.save({"w": torch.arange(10_000)}, f))
    assert info == {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert torch.equal(torch.load(path)["w"], torch.arange(10_000))


# ---- saves in the background (in process: one rank, gloo, an engine that saves like DeepSpeed's) ---------


def test_host_copy_serializes_the_same_bytes_and_training_cannot_change_it():
    import collections
    import io

    import torch

    from jobs.snapshot import HostPool, Snapshot

    flat = torch.randn(1000)  # like ZeRO's flat buffers: the state's tensors are views of one storage
    weights = collections.OrderedDict(w=flat[:600].view(20, 30), b=flat[600:620])
    weights._metadata = {"": {"version": 1}}  # what Module.state_dict sets on its OrderedDict
    master = torch.nn.Parameter(torch.randn(50))
    groups = [{"params": [0, 1], "lr": 1e-3}]
    state = {"module": weights, "fp32": [master.narrow(0, 0, 40)], "master": master, "groups": groups,
             "again": groups, "shapes": (torch.Size([20, 30]), torch.float32), "step": torch.tensor(7), "empty":
             torch.empty(0)}

    def saved(obj) -> bytes:
        f = io.BytesIO()
        torch.save(obj, f)
        return f.getvalue()

    pool = HostPool()
    snap = Snapshot(pool)
    copy = snap.copy(state)
    snap.ready()
    before = saved(state)
    assert saved(copy) == before  # the same storages, views, sharing, types and requires_grad
    assert copy["again"] is copy["groups"] and type(copy["module"]) is collections.OrderedDict
    flat.add_(1.0)  # training goes on
    with torch.no_grad():
        master.mul_(2.0)
    groups[0]["lr"] = 5e-4
    assert saved(copy) == before
    assert snap.nbytes == 4 * (1000 + 50) + 8  # each storage once: flat, master, the int64 step
    snap.release()
    again = Snapshot(pool)
    again.copy(state)
    assert pool.allocated == snap.nbytes  # the second save reuses the first one's buffers


class TorchCheckpointEngine:
    """Named as DeepSpeed's plain engine: Checkpointer routes its writes through write_file."""

    zipfile_serialization = True

    def save(self, state_dict, path):
        raise AssertionError("routed by Checkpointer, never called")


class FakeEngine:
    """What Checkpointer.save uses of a DeepSpeed engine: save_checkpoint, saving through its checkpoint engine."""

    def __init__(self):
        import torch

        self.checkpoint_engine = TorchCheckpointEngine()
        self.weights = torch.zeros(10_000)

    def train_step(self) -> None:
        self.weights.add_(1.0)

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.weights}}, str(folder / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer_state_dict": {"exp_avg": self.weights * 0.5}},
                                    str(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


@pytest.fixture
def one_rank():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def saver(run: Path, logs: list) -> Checkpointer:
    return Checkpointer(run, SimpleNamespace(checkpoint=SimpleNamespace(keep_last=5)), 0, 1, log=logs.append)


def trainer_state(step: int) -> dict:
    return {"step": step, "metric": None, "best_step": None}


def test_a_background_save_moves_latest_only_once_written_and_the_next_save_waits_for_it(one_rank, tmp_path,
                                                                                          monkeypatch):
    import threading

    import torch

    gate = threading.Event()  # holds the background write before its first file
    niceness = {}  # of the thread that writes, and of the training thread

    def held(self, step, background=False):
        if background:
            niceness["write"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            gate.wait(30)

    monkeypatch.setattr(Checkpointer, "_delay", held)
    run, logs, engine = tmp_path / "run", [], FakeEngine()
    ckpt = saver(run, logs)
    ckpt.save(engine, trainer_state(1), {"position": 1})
    assert niceness == {}  # a blocking save runs on the training thread, at its priority
    assert latest(run) == "checkpoints/step-00000001" and logs[-1].startswith("checkpoint step 1 saved in ")

    engine.train_step()  # weights 1.0
    ckpt.save(engine, trainer_state(2), {"position": 2}, background=True)
    tmp = run / contract.CHECKPOINTS_DIR / (TMP_PREFIX + step_name(2))
    for _ in range(3):  # training goes on and changes the state; the write waits at the gate
        engine.train_step()
        ckpt.poll()
    assert ckpt.in_flight == 2 and latest(run) == "checkpoints/step-00000001"
    assert tmp.is_dir() and not list(tmp.iterdir())  # nothing written yet, nothing counts
    assert checkpoints(run) == {1: None}

    # The next save waits for the write in flight: it cannot start before the gate opens.
    done = threading.Event()
    blocking = threading.Thread(target=lambda: (ckpt.save(engine, trainer_state(5), {"position": 5}), done.set()))
    blocking.start()
    assert not done.wait(0.5) and latest(run) == "checkpoints/step-00000001"
    gate.set()
    blocking.join(30)
    assert done.is_set() and ckpt.in_flight is None
    assert latest(run) == "checkpoints/step-00000005" and checkpoints(run) == {1: None, 2: None, 5: None}
    # The write yields the CPU to training: its thread runs 10 nice levels below the training thread.
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert niceness["write"] == min(training + 10, 19) and training < 19
    assert re.fullmatch(r"checkpoint step 2 saved in [0-9.]+s \(written in the background; training was blocked "
                        r"[0-9.]+s for the copy of 0\.00 GB to host memory\)", logs[-2]), logs
    folder = run / contract.CHECKPOINTS_DIR / step_name(2)
    assert torch.equal(torch.load(folder / "mp_rank_00_model_states.pt")["module"]["w"], torch.ones(10_000))
    assert torch.load(folder / "rank-00000.pt", weights_only=False)["position"] == 2


def test_an_error_in_the_background_write_surfaces_at_the_next_step_and_latest_stays(one_rank, tmp_path,
                                                                                   monkeypatch):
    import errno

    import jobs.checkpoint as C
    from jobs.checkpoint import CheckpointError

    run, logs, engine = tmp_path / "run", [], FakeEngine()
    ckpt = saver(run, logs)
    ckpt.save(engine, trainer_state(1), {"position": 1}, background=True)
    ckpt.wait()
    assert latest(run) == "checkpoints/step-00000001"

    real = C.write_file

    def full_disk(path, fill):
        if path.name == "rank-00000.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, fill)

    monkeypatch.setattr(C, "write_file", full_disk)
    ckpt.save(engine, trainer_state(2), {"position": 2}, background=True)  # returns: the write is the thread's
    ckpt._job.thread.join(30)
    with pytest.raises(CheckpointError) as info:
        ckpt.poll()  # the step boundary after the write ended
    message = str(info.value)
    assert message.startswith("checkpoint step-00000002 could not be written: rank 0: no space left on device "
                              "(ENOSPC) writing checkpoints/.tmp-step-00000002/rank-00000.pt"), message
    assert "checkpoints/step-00000001 is intact and still `latest`" in message, message
    assert latest(run) == "checkpoints/step-00000001" and checkpoints(run) == {1: None}
    assert not [p for p in (run / contract.CHECKPOINTS_DIR).iterdir() if p.name.startswith(TMP_PREFIX)]
    assert ckpt.in_flight is None

    monkeypatch.setattr(C, "write_file", real)  # room again: the next save works
    ckpt.save(engine, trainer_state(3), {"position": 3}, background=True)
    ckpt.wait()
    assert latest(run) == "checkpoints/step-00000003" and checkpoints(run) == {1: None, 3: None}
