"""The launch contract: the outcome table (pure), and jobs.launch for real as a Kubernetes pod runs it.

The Kubernetes half runs the container command and environment of a rendered PyTorchJob (one node, the
PET_* variables the training operator injects) as a process on this machine, and checks the three outcomes:
completed -> 0, saved on SIGTERM -> 143 (the ExitCode restart policy retries >= 128), bad input -> 1 (it
does not), each with its record in the run directory and its termination message, which `mbl status` shows.
The same outcomes on the local backend and on the Slurm cluster are in test_local_backend.py and
test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import contract
from launcher.backends import k8s_render
from launcher.backends.base import JobState
from launcher.backends.k8s import state_from_conditions, termination_message
from launcher.loading import load_spec
from launcher.outcomes import Outcome, classify, crash_restarts, last_outcome, records, write_record

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIGKILL = -int(signal.SIGKILL)


# ---- the table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("codes,sig,error,before,after,restarts,limit,expected", [
    ({}, None, None, None, 30, 0, 3, ("done", "done")),
    ({}, "SIGTERM", None, 10, 20, 0, 3, ("requeue", "signal")),
    ({}, "SIGUSR1", None, None, None, 5, 3, ("requeue", "signal")),  # a signal never counts as a failure
    ({0: 2, 1: 2}, None, None, None, None, 0, 3, ("failed", "usage")),
    ({0: 2, 1: SIGKILL}, None, None, 10, 20, 0, 3, ("failed", "usage")),  # bad input beats progress
    ({0: 75, 1: 75}, None, None, 10, 20, 0, 3, ("requeue", "saved")),
    ({0: 75, 1: SIGKILL}, None, None, 10, 20, 0, 3, ("requeue", "saved")),
    ({1: SIGKILL}, None, None, None, None, 0, 3, ("failed", "crash")),  # no checkpoint at all
    ({1: SIGKILL}, None, None, 30, 30, 0, 3, ("failed", "crash")),  # no new checkpoint
    ({1: SIGKILL}, None, None, 30, 60, 0, 3, ("requeue", "crash")),  # progress, restarts left
    ({1: 1}, None, None, None, 30, 2, 3, ("requeue", "crash")),
    ({1: 1}, None, None, 30, 60, 3, 3, ("failed", "crash")),  # restarts used up
    ({}, None, "torchrun: RendezvousTimeoutError: ...", 30, 30, 0, 3, ("failed", "crash")),
    ({1: 1}, None, None, 30, 60, 0, 0, ("failed", "crash")),  # the local backend restarts nothing
])
def test_outcome_table(codes, sig, error, before, after, restarts, limit, expected) -> None:
    out = classify(codes, sig, error, before, after, restarts, limit)
    assert (out.outcome, out.cause) == expected, out.reason
    assert out.exit_code == {"done": contract.LAUNCH_DONE, "requeue": contract.LAUNCH_REQUEUE,
                             "failed": contract.LAUNCH_FAILED}[expected[0]]


def test_requeue_code_is_retried_by_the_operator_and_the_others_are_not() -> None:
    # training-operator ExitCode policy: 1-127 permanent, 128-255 retryable
    assert contract.LAUNCH_REQUEUE >= 128 and contract.LAUNCH_FAILED < 128
    assert k8s_render.RETRYABLE_EXIT_CODE == contract.LAUNCH_REQUEUE


def test_records_count_crash_restarts_per_job_and_attempt(tmp_path: Path) -> None:
    def rec(job: str, attempt: int, host: str, outcome: str, cause: str) -> None:
        write_record(tmp_path, {"job": job, "attempt": attempt, "host": host, "time": time.time(),
                                "outcome": outcome, "cause": cause, "reason": f"{outcome} {cause} {attempt}"})

    rec("7", 0, "node1", "requeue", "crash")
    rec("7", 0, "node2", "requeue", "crash")  # two nodes, one attempt: one restart
    rec("7", 1, "node1", "requeue", "signal")  # a preemption is not a failure
    rec("7", 2, "node1", "requeue", "crash")
    rec("8", 0, "node1", "requeue", "crash")  # another job in the same run dir (a resubmission)
    assert crash_restarts(tmp_path, "7") == 2 and crash_restarts(tmp_path, "8") == 1
    rec("7", 3, "node1", "requeue", "crash")
    rec("7", 3, "node2", "failed", "usage")
    assert len(records(tmp_path)) == 7
    assert last_outcome(tmp_path) == "attempt 3: failed: failed usage 3"  # the worst node of the newest attempt


def test_termination_message_reaches_status() -> None:
    pod = {"status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": {
        "exitCode": 1, "message": "failed: bad input (rank 0: exit 2); fix it and submit again"}}}]}}
    assert termination_message(pod) == "failed: bad input (rank 0: exit 2); fix it and submit again"
    restarted = {"status": {"containerStatuses": [{"state": {"running": {}}, "lastState": {"terminated": {
        "exitCode": 143, "message": "requeue: SIGTERM: the ranks were asked to save and stop"}}}]}}
    assert termination_message(restarted).startswith("requeue: SIGTERM")
    assert termination_message({"status": {}}) == ""
    assert state_from_conditions([{"type": "Failed", "status": "True"}])[0] is JobState.FAILED


# ---- jobs.launch for real, as a pod runs it ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_process(tmp_path: Path, tag: str, *sets: str) -> tuple[list[str], dict[str, str], Path]:
    """The rendered PyTorchJob's Master container (command, env), made runnable here: the PVC is a folder
    (k8s.mount_path), the spec ConfigMap a file, the operator's PET_* variables set for one node."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True, exist_ok=True)
    corpus = shared / "data" / "corpus.txt"
    if not corpus.exists():
        shutil.copy(REPO / "examples" / "data" / "corpus.txt", corpus)
    run_dir = shared / "runs" / tag
    spec = load_spec(REPO / "examples" / "pretrain-tiny.yaml", [
        f"name={tag}", "image=localhost/mbl-trainer:test", f"k8s.mount_path={shared}", f"checkpoint.dir={run_dir}",
        f"data.train=[{corpus}]", "distributed.gpus_per_node=1", "train.global_batch_size=16",
        "train.max_steps=20", "checkpoint.every_steps=10", "train.eval_every_steps=10", "train.warmup_steps=2",
        "checkpoint.save_grace_seconds=60", *sets])
    job = k8s_render.render_objects(spec)[1]
    ctr = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    spec_file = tmp_path / f"{tag}-spec.yaml"  # the ConfigMap mount
    spec_file.write_text(spec.to_yaml())
    command = [sys.executable if c == "python" else str(spec_file) if c == k8s_render.SPEC_PATH else c
               for c in ctr["command"]]
    env = {**os.environ, **{e["name"]: e["value"] for e in ctr["env"] if "value" in e},
           "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(_free_port()), "PET_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = str(REPO)
    return command, env, run_dir


@pytest.mark.slow
def test_pod_outcomes_completed_signal_and_bad_input(tmp_path: Path) -> None:
    assert "jobs.launch" in pod_process(tmp_path, "probe")[0]

    # completed: exit 0, recorded as done
    command, env, run_dir = pod_process(tmp_path, "done")
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == contract.LAUNCH_DONE, proc.stderr[-3000:]
    assert (run_dir / contract.DONE_FILE).exists()
    assert last_outcome(run_dir).startswith("attempt 0: done")

    # SIGTERM (eviction, preemption): the ranks save and the pod exits 143 (its restart resumes: the kube play
    # and Slurm tests show that)
    command, env, run_dir = pod_process(tmp_path, "term", "train.max_steps=400", "checkpoint.every_steps=200",
                                        "train.eval_every_steps=200")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while not _step_at_least(run_dir, 10):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == contract.LAUNCH_REQUEUE, out[-3000:]
    saved = int((run_dir / contract.LATEST_FILE).read_text().strip().rsplit("-", 1)[1])
    assert 10 <= saved < 200, saved  # saved where it stopped, not at a periodic checkpoint
    assert last_outcome(run_dir).startswith("attempt 0: requeue: SIGTERM")

    # bad input: exit 1, which the operator does not retry, and the reason for the termination message
    command, env, run_dir = pod_process(tmp_path, "bad", f"data.train=[{tmp_path}/shared/data/missing.txt]")
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == contract.LAUNCH_FAILED, proc.stderr[-3000:]
    outcome = last_outcome(run_dir)
    assert "failed: bad input" in outcome, outcome
    assert "missing.txt" in proc.stderr


def _step_at_least(run_dir: Path, step: int) -> bool:
    path = run_dir / contract.METRICS_FILE
    try:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return False
    return any(r.get("step", 0) >= step for r in rows)


def test_outcome_exit_codes_match_the_contract() -> None:
    assert Outcome("done", "done", "").exit_code == 0
    assert Outcome("requeue", "signal", "").exit_code == 143
    assert Outcome("failed", "usage", "").exit_code == 1


def test_an_older_torchrun_without_shutdown_timeout_keeps_the_grace(monkeypatch) -> None:
    """torch 2.11's torchrun (the GPU image's) has no --shutdown-timeout: it is dropped, not an exit 2 of every
    job, and the grace moves to the default of the process context's close(), which that torchrun calls."""
    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing.api import PContext

    from jobs.launch import compatible_args

    args = ["--standalone", "--nproc-per-node=2", "--shutdown-timeout=330", "--signals-to-handle=SIGTERM,SIGUSR1"]
    assert compatible_args(args) == (args, [])  # this torch knows them all
    newest = run.get_args_parser

    def older():
        parser = newest()
        parser._actions = [a for a in parser._actions if "--shutdown-timeout" not in a.option_strings]
        return parser

    monkeypatch.setattr(run, "get_args_parser", older)
    monkeypatch.setattr(PContext.close, "__defaults__", PContext.close.__defaults__)
    keep, dropped = compatible_args(args)
    assert dropped == ["--shutdown-timeout=330"] and "--shutdown-timeout=330" not in keep
    assert PContext.close.__defaults__[-1] == 330


def test_a_hang_requeues_until_the_restarts_are_used_up() -> None:
    hang = {0: contract.HANG_EXIT_CODE, 1: -signal.SIGTERM}
    first = classify(hang, None, None, 10, 10, 0, 0)  # even the local backend (no restarts) requeues a first hang
    assert (first.outcome, first.cause, first.exit_code) == ("requeue", "hang", contract.LAUNCH_REQUEUE)
    assert "rank(s) 0" in first.reason and "stacks" in first.reason
    assert classify(hang, None, None, 10, 10, 3, 10).outcome == "requeue"
    assert classify(hang, None, None, 10, 10, 10, 10).outcome == "failed"


def test_the_watchdog_dumps_every_stack_and_exits_76(tmp_path: Path) -> None:
    """A rank whose step does not come back: stacks of every thread on stderr, exit 76, within the limit; while
    the loop saves (`long()`), the long limit applies instead."""
    script = (
        "import time\n"
        "from jobs.watchdog import Watchdog\n"
        "wd = Watchdog(0, 1.0, 3.0, poll=0.1)\n"
        "wd.beat(5, 0.01)\n"
        "with wd.long():\n"
        "    time.sleep(1.8)\n"  # a save longer than the step limit, shorter than the long one: no hang
        "print('save survived', flush=True)\n"
        "def stuck_in_a_collective():\n"
        "    time.sleep(60)\n"
        "stuck_in_a_collective()\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == contract.HANG_EXIT_CODE, proc.stderr
    assert time.time() - t0 < 30
    assert "save survived" in proc.stdout
    assert "[mbl] hang: rank 0" in proc.stderr and "after step 5" in proc.stderr
    assert "stuck_in_a_collective" in proc.stderr and "mbl-watchdog" not in proc.stdout


def test_a_bad_node_requeues_until_the_restarts_are_used_up() -> None:
    bad = {0: contract.NODE_EXIT_CODE, 1: contract.NODE_EXIT_CODE}
    first = classify(bad, None, None, None, None, 0, 0)
    assert (first.outcome, first.cause) == ("requeue", "node") and "bad-nodes" in first.reason
    assert classify(bad, None, None, None, None, 3, 3).outcome == "failed"


def test_the_preflight_runs_on_multi_node_attempts_unless_the_spec_says(monkeypatch) -> None:
    from jobs.preflight import wanted

    spec = load_spec(REPO / "examples" / "pretrain-tiny.yaml")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not wanted(spec, 2) and wanted(spec, 4)
    on = load_spec(REPO / "examples" / "pretrain-tiny.yaml", sets=["distributed.preflight=true"])
    off = load_spec(REPO / "examples" / "pretrain-tiny.yaml", sets=["distributed.preflight=false"])
    assert wanted(on, 2) and not wanted(off, 4)


def test_the_preflight_files_of_a_kubernetes_job_are_plain_file_names(monkeypatch) -> None:
    """A pod's job id is k8s:<namespace>/<name>: its token and bad-nodes files must not point into folders."""
    from jobs.preflight import job_file_name

    monkeypatch.setenv("MBL_JOB_ID", "k8s:mbl/kp-bbe023")
    assert job_file_name() == "k8s_mbl_kp-bbe023"
    monkeypatch.setenv("MBL_JOB_ID", "2086")
    assert job_file_name() == "2086"  # the Slurm script reads logs/bad-nodes-${SLURM_JOB_ID}
