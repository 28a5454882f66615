"""The Kubernetes pods of `mbl render --k8s`, run for real under `podman kube play` (no API server here).

tests/kube_play.py expands the rendered job the way its operator would (the PyTorchJob's Master-0 and
Worker-0 with the training operator's PET_* and MASTER_* variables; the TrainJob's node pods with Kubeflow
Trainer's), with the ConfigMap mounted and a named podman volume for the PVC, and plays each pod:

- two pods train the tiny pre-train together (2 nodes x 1 rank); stopped with SIGTERM mid-run (a preemption,
  a drain) they save, exit with the code the job's restart rule retries (143: the PyTorchJob's `restartPolicy:
  ExitCode` retries >= 128; the TrainJob runtime's podFailurePolicy retries 137 and 143), are created again,
  resume from that save and finish with DONE at the same final step, once for each job API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from container_util import owners, podman, require_image
from kube_play import (
    Pods,
    create_network,
    expand_pytorchjob,
    expand_trainjob,
    for_podman,
    remove_network,
    trainjob_retries,
)
from slurm_util import last_step, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MOUNT = "/shared"  # k8s.mount_path, the default
POD_UID = 1000  # the rendered pod's runAsUser
STEPS, EVERY = 90, 30


@pytest.fixture
def job(tmp_path: Path):
    """A folder for one job's shared storage, its podman volume and network; removed afterwards."""
    image = require_image()
    suffix = uuid.uuid4().hex[:6]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "corpus.txt").write_text((ROOT / "examples" / "data" / "corpus.txt").read_text())
    volume, network = f"mbl-shared-{suffix}", f"mbl-kp-{suffix}"
    podman("volume", "create", "--opt", "type=none", "--opt", "o=bind", "--opt", f"device={shared}", volume)
    subnet = create_network(network)
    state = {"image": image, "suffix": suffix, "shared": shared, "volume": volume, "network": network,
             "subnet": subnet, "work": tmp_path, "pods": None}
    yield state
    if state["pods"] is not None:
        state["pods"].down()
    remove_network(network)
    podman("volume", "rm", "-f", volume, check=False)


def render(job: dict, api: str, name: str, *sets: str) -> list[dict]:
    args = [
        f"name={name}", f"image={job['image']}", f"k8s.api={api}", f"checkpoint.dir={MOUNT}/runs/{name}",
        f"data.train=[{MOUNT}/corpus.txt]", "distributed.nodes=2", "distributed.gpus_per_node=1",
        "resources.mem_per_node=2G", f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}",
        f"train.eval_every_steps={EVERY}", "train.warmup_steps=5", *sets,
    ]
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "render", "--k8s",
                           str(ROOT / "examples" / "pretrain-tiny.yaml"), *(x for s in args for x in ("--set", s))],
                          capture_output=True, text=True, timeout=60, cwd=job["work"], check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def play(job: dict, docs: list[dict], api: str) -> Pods:
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    for cm in configmaps:
        cm["metadata"].pop("namespace", None)
    if api == "pytorchjob":
        pods, extra, retries = expand_pytorchjob(next(d for d in docs if d["kind"] == "PyTorchJob")), {}, None
    else:
        runtime = yaml.safe_load((ROOT / "manifests" / "trainer" / "mbl-torch-runtime.yaml").read_text())
        trainjob = next(d for d in docs if d["kind"] == "TrainJob")
        pods = expand_trainjob(trainjob, runtime)
        name = trainjob["metadata"]["name"]
        extra = {f"{p['metadata']['name']}.{name}": p["metadata"]["name"] for p in pods}  # the JobSet's subdomain
        retries = trainjob_retries(runtime)
    pods, addresses = for_podman(pods, {"mbl-shared": job["volume"]}, job["subnet"], extra)
    played = Pods(job["work"], configmaps, pods, job["network"], addresses)
    if retries:
        played.retries = retries
    job["pods"] = played
    played.play()
    return played


def env_of(pods: Pods, pod: str) -> dict[str, str]:
    out = podman("inspect", "--format", "{{json .Config.Env}}", pods.container(pod))
    return dict(e.split("=", 1) for e in json.loads(out.stdout))


def assert_finished(job: dict, pods: Pods, name: str) -> Path:
    run_dir = job["shared"] / "runs" / name
    assert (run_dir / "DONE").exists(), pods.logs(pods.names()[0])[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    # Written as the pod's user (runAsUser) onto the volume standing in for the PVC.
    assert owners(run_dir) == {(POD_UID, POD_UID)}
    return run_dir


def sigterm_and_resume(job: dict, pods: Pods, name: str) -> str:
    run_dir = job["shared"] / "runs" / name
    wait_for("a periodic checkpoint", lambda: last_step(run_dir) > EVERY + 5, 240)
    pods.stop(grace=120)  # all pods at once, as a node drain or Kueue's preemption does
    codes = {p: pods.state(p)[1] for p in pods.names()}
    assert set(codes.values()) == {143}, {p: pods.logs(p)[-2000:] for p in codes}
    assert all(pods.retries(c) for c in codes.values())
    assert sorted(pods.restart_retryable()) == sorted(pods.names())
    codes = pods.wait_exited(300)
    assert set(codes.values()) == {0}, {p: pods.logs(p)[-2000:] for p in codes}
    assert_finished(job, pods, name)
    first = pods.logs(pods.names()[0])
    resumed = int(first.split("resumed from checkpoints/step-")[1].split()[0].lstrip("0") or 0)
    # The ranks saved on SIGTERM, past the last periodic checkpoint, and the new pods resumed from there.
    assert resumed > EVERY, first[-3000:]
    return first


def test_pytorchjob_pods_train_together_sigterm_retry_resume_and_finish(job: dict) -> None:
    name = f"kp-{job['suffix']}"
    pods = play(job, render(job, "pytorchjob", name), "pytorchjob")
    master, worker = f"{name}-master-0", f"{name}-worker-0"
    assert pods.names() == [master, worker]
    env = env_of(pods, worker)
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"], env["WORLD_SIZE"], env["RANK"]) \
        == ("2", "1", "1", "2", "1")
    assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"] == master and env["PET_MASTER_PORT"] == "23456"
    assert env_of(pods, master)["PET_NODE_RANK"] == "0"
    log = sigterm_and_resume(job, pods, name)
    # The two pods trained as one job: 2 ranks (1 per pod), and the master finished it.
    assert "2 ranks x micro 16" in log and "mbl launch: done (exit 0)" in log
    assert f"on {worker}" in pods.logs(worker) and "mbl launch: done (exit 0)" in pods.logs(worker)


def test_trainjob_pods_sigterm_retry_resume_and_finish(job: dict) -> None:
    """The TrainJob path where it differs: its pods, env, rendezvous port and retry rule."""
    name = f"kt-{job['suffix']}"
    pods = play(job, render(job, "trainjob", name), "trainjob")
    first, second = f"{name}-node-0-0", f"{name}-node-0-1"
    assert pods.names() == [first, second]
    env = env_of(pods, second)
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"]) == ("2", "1", "1")
    assert env["PET_MASTER_ADDR"] == f"{first}.{name}" and env["PET_MASTER_PORT"] == "29500"
    assert not pods.retries(1) and pods.retries(143) and pods.retries(137)
    sigterm_and_resume(job, pods, name)
