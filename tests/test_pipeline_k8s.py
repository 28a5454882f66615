"""A pipeline on Kubernetes (launcher/pipeline_k8s.py): one PyTorchJob per stage and sweep point, the later
stages' pods waiting for their upstream run directories' DONE in an init container (launcher/stagewait.py).

The render of examples/pipeline-tiny.yaml validates against the CRDs (as tests/test_k8s_render.py checks
every job), and the wait is tested on its own: upstream done, upstream failed for good, upstream never
finishing (it fails after its timeout with a clear message).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_k8s_render import IMAGE, PROFILE, admission_problems, pod_templates, validate_object, validate_pod_template

from launcher.backends.k8s import K8sBackend
from launcher.contract import DONE_FILE
from launcher.pipeline import load_pipeline
from launcher.pipeline_k8s import INIT_CONTAINER, WAIT_SLACK, render, wait_timeout
from launcher.stagewait import wait

REPO = Path(__file__).resolve().parents[1]


def test_the_pipeline_render_validates_and_later_stages_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths resolve under the volume's mount path
    pipeline = load_pipeline(REPO / "examples" / "pipeline-tiny.yaml",
                             [f"image={IMAGE}", f"k8s.mount_path={tmp_path}"])
    objects = [d for d in yaml.safe_load_all(render(pipeline, K8sBackend(profile=PROFILE))) if d is not None]
    jobs = [o for o in objects if o["kind"] == "PyTorchJob"]
    assert len(jobs) == len(pipeline.points) == 13 and len(objects) == 26  # a ConfigMap + a PyTorchJob each
    for obj in objects:
        validate_object(obj)
    pretrain = pipeline.stage("pretrain").points[0]
    by_name = {j["metadata"]["name"]: j for j in jobs}
    for job in jobs:
        assert admission_problems(job) == []
        for i, template in enumerate(pod_templates(job)):
            validate_pod_template(template, f"{job['metadata']['name']}-{i}")
        inits = pod_templates(job)[0]["spec"].get("initContainers", [])
        if job["metadata"]["name"] == pretrain.name:
            assert inits == []
            continue
        (init,) = inits
        assert init["name"] == INIT_CONTAINER and init["image"] == IMAGE
        timeout = wait_timeout(pipeline, pipeline.stage("classify"))
        assert init["command"] == ["python", "-m", "launcher.stagewait", f"--timeout={timeout}", "--poll=10",
                                   f"pretrain={pretrain.run_dir}"]
        assert [m["mountPath"] for m in init["volumeMounts"]] == [str(tmp_path)]
    # the wait counts in the job's deadline: 30 min of pre-train (+ retries) and the slack on top of its own
    spec = pretrain.spec
    assert wait_timeout(pipeline, pipeline.stage("qa")) == \
        spec.resources.time_limit_seconds * (1 + spec.k8s.max_restarts) + WAIT_SLACK
    classify = by_name[pipeline.stage("classify").points[0].name]
    own = pipeline.stage("classify").points[0].spec.resources.time_limit_seconds
    assert classify["spec"]["runPolicy"]["activeDeadlineSeconds"] == own + timeout


def test_cli_renders_a_pipeline_for_k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from launcher.cli import cli

    monkeypatch.chdir(tmp_path)
    args = [str(REPO / "examples" / "pipeline-tiny.yaml"), "--set", f"image={IMAGE}", "--set",
            f"k8s.mount_path={tmp_path}"]
    result = CliRunner().invoke(cli, ["render", "--k8s", *args])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.output) if d is not None]  # the plan is YAML comments
    assert sum(d["kind"] == "PyTorchJob" for d in docs) == 13
    assert "#   classify: finetune, after pretrain, sweep of 4 point(s), as many at a time as Kueue admits" in \
        result.output  # every point is a job from the start: Kueue's quota throttles them, not max_parallel
    dry = CliRunner().invoke(cli, ["submit", "--k8s", "--dry-run", *args])
    assert dry.exit_code == 0 and dry.output.count("kind: PyTorchJob") == 13, dry.output[-2000:]


async def test_submit_creates_every_job_and_a_resubmission_keeps_them(kmock, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Against kmock (tests/test_k8s_client.py): 13 ConfigMaps and PyTorchJobs, upstream first; again: kept."""
    import asyncio

    import kubernetes

    from launcher.pipeline_k8s import submit
    from launcher.registry import Registry

    kmock.resources["v1/pods"] = {}
    monkeypatch.chdir(tmp_path)
    pipeline = load_pipeline(REPO / "examples" / "pipeline-tiny.yaml",
                             [f"image={IMAGE}", f"k8s.mount_path={tmp_path}", "k8s.namespace=mbl"])
    cfg = kubernetes.client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    backend = K8sBackend(profile=PROFILE, configuration=cfg)
    lines: list[str] = []

    def run() -> int:  # in the client's thread (SQLite objects stay in the thread that made them)
        return submit(pipeline, backend, Registry(tmp_path / "registry.db"), lines.append)

    assert await asyncio.to_thread(run) == 0
    posts = [r.url.path.rsplit("/", 1)[-1] for r in kmock if r.method == "POST"]
    assert posts == ["pytorchjobs", "configmaps"] * 13
    first = kmock.objects[("kubeflow.org/v1/pytorchjobs", "mbl", pipeline.points[0].name)]
    assert first["metadata"]["name"] == "tiny-pipeline-pretrain"
    later = kmock.objects[("kubeflow.org/v1/pytorchjobs", "mbl", pipeline.points[-1].name)]
    init = later["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == INIT_CONTAINER
    assert {r.name for r in Registry(tmp_path / "registry.db").list()} == {p.name for p in pipeline.points}
    lines.clear()
    assert await asyncio.to_thread(run) == 0
    assert lines[-1] == "pipeline tiny-pipeline: 0 job(s) created, 13 kept; mbl list shows them"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_returns_once_every_upstream_is_done(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / DONE_FILE).write_text("")
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= 30:
            (b / DONE_FILE).write_text("")

    ok, message = wait({"a": a, "b": b}, timeout=100, poll=10, clock=clock, sleep=sleep)
    assert ok and message == "mbl: upstream done: a, b" and clock.now == 30


def test_wait_gives_up_at_once_when_an_upstream_failed_for_good(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir(parents=True)
    (tmp_path / "logs" / "outcome-j-0.node.json").write_text(json.dumps(
        {"attempt": 0, "outcome": "failed", "reason": "data.train: no such file /x.txt", "time": 1}))
    clock = Clock()
    ok, message = wait({"pretrain": tmp_path}, timeout=100, clock=clock, sleep=clock.sleep)
    assert not ok and clock.now == 0
    assert message.startswith("mbl: upstream stage pretrain failed (attempt 0: data.train: no such file /x.txt)")


def test_an_upstream_that_never_finishes_fails_after_the_timeout_with_a_clear_message(tmp_path: Path) -> None:
    """The init container itself: `python -m launcher.stagewait` exits 1 after --timeout, and says why."""
    upstream = tmp_path / "pretrain"
    upstream.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launcher.stagewait", "--timeout=2", "--poll=0.5",
                           f"pretrain={upstream}"], capture_output=True, text=True, cwd=REPO, timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("mbl: gave up after waiting 2s (timeout 2s) for upstream stage(s) pretrain "
                           f"({upstream}/DONE missing): they did not finish"), last
    assert 2 <= took < 15
