"""K8sBackend against kmock, a Kubernetes-shaped HTTP server on localhost: submit, status through each
phase, logs, cancel, and the errors a user meets (no CRD, forbidden, already exists, unreachable).

The server runs on the test's event loop, so every (blocking) client call goes through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from launcher.backends.base import JobRef, JobState
from launcher.backends.k8s import K8sBackend, state_from_conditions
from launcher.errors import BackendError
from launcher.spec import JobSpec
from test_k8s_render import PROFILE, example

kubernetes = pytest.importorskip("kubernetes")
kmock_lib = pytest.importorskip("kmock")

NS = "mbl"
JOBS = "/apis/kubeflow.org/v1/namespaces/mbl/pytorchjobs"
CMS = "/api/v1/namespaces/mbl/configmaps"


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def backend_for(kmock: Any, **kwargs: Any) -> K8sBackend:
    cfg = kubernetes.client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    return K8sBackend(profile=PROFILE, configuration=cfg, **kwargs)


def pretrain(**sets: Any) -> JobSpec:
    return example("pretrain", **sets)


async def submit(backend: K8sBackend, spec: JobSpec) -> JobRef:
    return await asyncio.to_thread(lambda: backend.submit(backend.dryrun(spec)))


def job_obj(kmock: Any, name: str = "mbert-base-pretrain") -> Any:
    return kmock.objects[("kubeflow.org/v1/pytorchjobs", NS, name)]


def set_conditions(kmock: Any, *conds: tuple[str, str]) -> None:
    job_obj(kmock).patch({"status": {"conditions": [
        {"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": m} for t, m in conds]}})


def add_pod(kmock: Any, name: str, phase: str, **status: Any) -> None:
    kmock.objects[("v1/pods", NS, name)] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"training.kubeflow.org/job-name": "mbert-base-pretrain"}},
        "status": {"phase": phase, **status},
    }


@pytest.fixture(autouse=True)
def _core_resources(kmock: Any) -> None:
    """A real API server serves pods with or without objects; kmock learns of resources as they appear."""
    kmock.resources["v1/pods"] = {}


# ---- submit ----------------------------------------------------------------------------------------


async def test_submit_creates_the_configmap_and_the_job(kmock: Any) -> None:
    backend = backend_for(kmock)
    spec = pretrain()
    ref = await submit(backend, spec)
    assert (ref.backend, ref.job_id, ref.name, ref.run_dir) == ("k8s", "mbl/mbert-base-pretrain",
                                                              "mbert-base-pretrain", "/shared/runs/mbert-base-pretrain")
    assert ref.extra["namespace"] == "mbl" and ref.extra["api"] == "pytorchjob" and ref.extra["nodes"] == 2
    json.dumps(ref.extra)  # the registry stores it as JSON
    job = job_obj(kmock)
    assert job["kind"] == "PyTorchJob"
    assert job["metadata"]["annotations"]["mbl/training-fingerprint"] == spec.training_fingerprint()
    assert job["spec"]["runPolicy"]["suspend"] is True
    cm = kmock.objects[("v1/configmaps", NS, "mbert-base-pretrain-spec")]
    assert JobSpec.model_validate(__import__("yaml").safe_load(cm["data"]["spec.yaml"])) == spec
    posts = [r for r in kmock if r.method == "POST"]
    assert [r.url.path for r in posts] == [JOBS, CMS]  # the job first: nothing is left behind on refusal
    assert all("dryRun" not in r.params for r in posts)


async def test_submit_trainjob(kmock: Any) -> None:
    backend = backend_for(kmock)
    spec = pretrain(**{"k8s.api": "trainjob"})
    ref = await submit(backend, spec)
    assert ref.extra["group"] == "trainer.kubeflow.org"
    assert kmock.objects[("trainer.kubeflow.org/v1alpha1/trainjobs", NS, "mbert-base-pretrain")]["kind"] == "TrainJob"


async def test_server_side_dry_run(kmock: Any) -> None:
    backend = backend_for(kmock, server_dry_run=True)
    await submit(backend, pretrain())
    posts = [r for r in kmock if r.method == "POST"]
    assert len(posts) == 2 and all(r.params.get("dryRun") == "All" for r in posts)


async def test_leftover_configmap_is_replaced(kmock: Any) -> None:
    kmock.objects[("v1/configmaps", NS, "mbert-base-pretrain-spec")] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "mbert-base-pretrain-spec", "namespace": NS}, "data": {"spec.yaml": "old"}}
    await submit(backend_for(kmock), pretrain())
    assert [r.method for r in kmock if r.url.path.startswith(CMS)] == ["POST", "PATCH"]


# ---- errors ----------------------------------------------------------------------------------------


async def test_no_crd_says_what_to_install(kmock: Any) -> None:
    kmock[f"post {JOBS}"] << 404 << status_body(404, "NotFound", "the server could not find the requested resource")
    with pytest.raises(BackendError, match="CustomResourceDefinition is not installed") as info:
        await submit(backend_for(kmock), pretrain())
    assert "training-operator" in (info.value.hint or "") and "v1.9.0" in (info.value.hint or "")
    assert not [r for r in kmock if r.url.path == CMS]


async def test_missing_namespace(kmock: Any) -> None:
    kmock[f"post {JOBS}"] << 404 << status_body(404, "NotFound", 'namespaces "mbl" not found',
                                                {"name": "mbl", "kind": "namespaces"})
    with pytest.raises(BackendError, match="namespace 'mbl' does not exist") as info:
        await submit(backend_for(kmock), pretrain())
    assert "manifests/" in (info.value.hint or "")


async def test_forbidden_names_verb_and_resource(kmock: Any) -> None:
    message = ('pytorchjobs.kubeflow.org is forbidden: User "alice" cannot create resource "pytorchjobs" '
               'in API group "kubeflow.org" in the namespace "mbl"')
    kmock[f"post {JOBS}"] << 403 << status_body(403, "Forbidden", message, {"group": "kubeflow.org",
                                                                             "kind": "pytorchjobs"})
    with pytest.raises(BackendError) as info:
        await submit(backend_for(kmock), pretrain())
    text = str(info.value)
    assert text.startswith("forbidden: you may not create pytorchjobs.kubeflow.org in namespace 'mbl'")
    assert "`create` on pytorchjobs.kubeflow.org" in (info.value.hint or "")


async def test_forbidden_configmap_rolls_the_job_back(kmock: Any) -> None:
    kmock[f"post {CMS}"] << 403 << status_body(403, "Forbidden", "configmaps is forbidden")
    with pytest.raises(BackendError, match="may not create configmaps"):
        await submit(backend_for(kmock), pretrain())
    deletes = [r for r in kmock if r.method == "DELETE"]
    assert [r.url.path for r in deletes] == [f"{JOBS}/mbert-base-pretrain"]


async def test_already_exists_same_spec(kmock: Any) -> None:
    backend = backend_for(kmock)
    await submit(backend, pretrain())
    set_conditions(kmock, ("Created", ""), ("Running", "running"))
    with pytest.raises(BackendError, match=r"job 'mbert-base-pretrain' already exists in namespace 'mbl' \(running\)") \
            as info:
        await submit(backend, pretrain())
    assert "mbl logs -f mbert-base-pretrain" in (info.value.hint or "")


async def test_refuses_to_replace_a_different_spec(kmock: Any) -> None:
    backend = backend_for(kmock)
    await submit(backend, pretrain())
    other = pretrain(**{"train.lr": "0.001"})
    with pytest.raises(BackendError, match="a different job named 'mbert-base-pretrain' already exists") as info:
        await submit(backend, other)
    assert "will not be replaced" in str(info.value)
    assert job_obj(kmock)["metadata"]["annotations"]["mbl/training-fingerprint"] == pretrain().training_fingerprint()
    assert len([r for r in kmock if r.method == "POST" and r.url.path == JOBS]) == 2


async def test_unreachable_cluster() -> None:
    cfg = kubernetes.client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: connection refused
    cfg.retries = 0
    backend = K8sBackend(profile=PROFILE, configuration=cfg)
    with pytest.raises(BackendError, match=r"cannot reach the Kubernetes API at http://127.0.0.1:9") as info:
        await asyncio.to_thread(lambda: backend.submit(backend.dryrun(pretrain())))
    assert "context" in (info.value.hint or "")


# ---- status ----------------------------------------------------------------------------------------


async def test_status_through_each_phase(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())

    async def status() -> Any:
        return await asyncio.to_thread(backend.status, ref)

    st = await status()  # just created, no status yet
    assert st.state is JobState.PENDING

    set_conditions(kmock, ("Created", "created"), ("Suspended", "PyTorchJob mbert-base-pretrain is suspended."))
    st = await status()
    assert st.state is JobState.PENDING and "Kueue" in st.reason and "'nlp'" in st.reason

    set_conditions(kmock, ("Created", "created"))
    add_pod(kmock, "mbert-base-pretrain-master-0", "Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu."}])
    add_pod(kmock, "mbert-base-pretrain-worker-0", "Pending", containerStatuses=[{
        "name": "pytorch", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}])
    st = await status()
    assert st.state is JobState.PENDING
    assert "master-0: unschedulable: 0/8 nodes are available: 8 Insufficient nvidia.com/gpu." in st.reason
    assert "worker-0: cannot pull the image" in st.reason
    assert st.detail == "2/2 pods (2 pending)"

    set_conditions(kmock, ("Created", ""), ("Running", "running"))
    for pod in ("mbert-base-pretrain-master-0", "mbert-base-pretrain-worker-0"):
        kmock.objects[("v1/pods", NS, pod)].patch({"status": {"phase": "Running"}})
    st = await status()
    assert st.state is JobState.RUNNING and st.detail == "2/2 pods (2 running)"

    set_conditions(kmock, ("Created", ""), ("Restarting", "job is restarting because Worker replica(s) failed."))
    assert (await status()).state is JobState.REQUEUED

    set_conditions(kmock, ("Created", ""), ("Running", ""), ("Succeeded", "done"))
    assert (await status()).state is JobState.COMPLETED

    set_conditions(kmock, ("Created", ""), ("Failed", 'job "x" is failing because "Master" replica(s) failed.'))
    st = await status()
    assert st.state is JobState.FAILED and "Master" in st.reason


@pytest.mark.parametrize("conditions,state", [
    ([], JobState.UNKNOWN),
    ([("Created", "True")], JobState.PENDING),
    ([("Created", "True"), ("Running", "True")], JobState.RUNNING),
    ([("Created", "True"), ("Running", "False"), ("Restarting", "True")], JobState.REQUEUED),
    ([("Running", "False"), ("Succeeded", "True")], JobState.COMPLETED),
    ([("Complete", "True")], JobState.COMPLETED),  # TrainJob
    ([("Failed", "True")], JobState.FAILED),
    ([("Suspended", "True"), ("Created", "True")], JobState.PENDING),
    ([("SomethingNew", "True")], JobState.UNKNOWN),
])
def test_condition_table(conditions: list[tuple[str, str]], state: JobState) -> None:
    conds = [{"type": t, "status": s} for t, s in conditions]
    assert state_from_conditions(conds)[0] is state


def test_deadline_is_a_timeout() -> None:
    conds = [{"type": "Failed", "status": "True",
              "message": "PyTorchJob x has failed because it was active longer than specified deadline"}]
    assert state_from_conditions(conds)[0] is JobState.TIMEOUT


async def test_status_of_a_vanished_job(kmock: Any) -> None:
    ref = JobRef("k8s", "mbl/gone", "gone", "/shared/runs/gone", {"namespace": NS, "api": "pytorchjob"})
    st = await asyncio.to_thread(backend_for(kmock).status, ref)
    assert st.state is JobState.UNKNOWN and "gone" in st.reason


async def test_status_without_crd(kmock: Any) -> None:
    kmock[f"get {JOBS}/x"] << 404 << status_body(404, "NotFound", "the server could not find the requested resource")
    ref = JobRef("k8s", "mbl/x", "x", "/shared/runs/x", {"namespace": NS, "api": "pytorchjob"})
    with pytest.raises(BackendError, match="CRD is not installed"):
        await asyncio.to_thread(backend_for(kmock).status, ref)


# ---- logs ------------------------------------------------------------------------------------------


async def test_logs_of_master_and_of_a_rank(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    kmock["get /api/v1/namespaces/mbl/pods/mbert-base-pretrain-master-0/log"] << b"step 10 loss 9.1\nstep 20 loss 8.7\n"
    kmock["get /api/v1/namespaces/mbl/pods/mbert-base-pretrain-worker-0/log"] << b"worker line\n"
    lines = await asyncio.to_thread(lambda: list(backend.logs(ref)))
    assert lines == ["step 10 loss 9.1\n", "step 20 loss 8.7\n"]
    followed = await asyncio.to_thread(lambda: list(backend.logs(ref, follow=True, rank=1)))
    assert followed == ["worker line\n"]
    logs = [r for r in kmock if r.url.path.endswith("/log")]
    assert logs[0].params.get("container") == "pytorch"
    assert logs[1].params.get("follow") == "true"


async def test_logs_of_a_pod_not_there_yet(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    kmock["get /api/v1/namespaces/mbl/pods/mbert-base-pretrain-master-0/log"] << 404 << status_body(
        404, "NotFound", 'pods "mbert-base-pretrain-master-0" not found', {"name": "mbert-base-pretrain-master-0"})
    with pytest.raises(BackendError, match="does not exist"):
        await asyncio.to_thread(lambda: list(backend.logs(ref)))
    with pytest.raises(Exception, match="--rank 2"):
        await asyncio.to_thread(lambda: list(backend.logs(ref, rank=2)))


# ---- cancel ----------------------------------------------------------------------------------------


async def test_cancel_deletes_in_the_foreground(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    set_conditions(kmock, ("Created", ""), ("Running", ""))
    assert await asyncio.to_thread(backend.cancel, ref) is True
    assert ref.extra["cancelled"] is True
    delete = [r for r in kmock if r.method == "DELETE" and r.url.path == f"{JOBS}/mbert-base-pretrain"]
    assert len(delete) == 1
    assert "Foreground" in (delete[0].params.get("propagationPolicy"), (delete[0].data or {}).get("propagationPolicy"))
    assert [r for r in kmock if r.method == "DELETE" and r.url.path == f"{CMS}/mbert-base-pretrain-spec"]
    assert (await asyncio.to_thread(backend.status, ref)).state is JobState.CANCELLED
    assert await asyncio.to_thread(backend.cancel, ref) is False  # gone: nothing to cancel


async def test_cancel_of_a_finished_job_is_a_no_op(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    set_conditions(kmock, ("Created", ""), ("Succeeded", "done"))
    assert await asyncio.to_thread(backend.cancel, ref) is False
    assert not [r for r in kmock if r.method == "DELETE"]


async def test_cancel_forbidden(kmock: Any) -> None:
    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    kmock[f"delete {JOBS}/mbert-base-pretrain"] << 403 << status_body(403, "Forbidden", "cannot delete")
    with pytest.raises(BackendError, match="may not delete pytorchjobs.kubeflow.org"):
        await asyncio.to_thread(backend.cancel, ref)


def test_backend_through_get_backend_accepts_cli_options() -> None:
    from launcher.backends import get_backend

    backend = get_backend("k8s", profile=None, kube_context="ctx", server_dry_run=True, force=False)
    assert isinstance(backend, K8sBackend) and backend.kube_context == "ctx" and backend.server_dry_run


async def test_cli_end_to_end_through_a_kubeconfig(kmock: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """`mbl submit/status/logs/cancel --k8s` as a user runs them: kubeconfig context, registry, JobRef.extra."""
    from click.testing import CliRunner

    from launcher.cli import cli

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(__import__("yaml").safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}},
                     {"name": "other", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}},
                     {"name": "other", "context": {"cluster": "other", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    spec_path = str(Path(__file__).resolve().parents[1] / "examples" / "finetune.yaml")

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    result = await asyncio.to_thread(run, "submit", "--k8s", spec_path, "--context", "kmock", "-n", "research")
    assert result.exit_code == 0, result.output
    job = kmock.objects[("kubeflow.org/v1/pytorchjobs", "research", "mbert-base-sst")]
    assert job["metadata"]["namespace"] == "research"
    job.patch({"status": {"conditions": [{"type": "Running", "status": "True"}]}})
    result = await asyncio.to_thread(run, "status", "mbert-base-sst")
    assert result.exit_code == 0 and "RUNNING" in result.output, result.output
    kmock["get /api/v1/namespaces/research/pods/mbert-base-sst-master-0/log"] << b"epoch 1 accuracy 0.91\n"
    result = await asyncio.to_thread(run, "logs", "mbert-base-sst")
    assert result.output == "epoch 1 accuracy 0.91\n"
    result = await asyncio.to_thread(run, "cancel", "mbert-base-sst")
    assert result.exit_code == 0 and "cancelled mbert-base-sst" in result.output


def test_one_client_per_kubeconfig_context(tmp_path: Any, monkeypatch: Any) -> None:
    """`mbl list` asks one backend about jobs of several contexts: each gets the client of its own context."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(__import__("yaml").safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "a",
        "clusters": [{"name": "a", "cluster": {"server": "https://a.example:6443"}},
                     {"name": "b", "cluster": {"server": "https://b.example:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "a", "context": {"cluster": "a", "user": "u"}},
                     {"name": "b", "context": {"cluster": "b", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    backend = K8sBackend()
    a, b = backend._client("a"), backend._client("b")
    assert a.configuration.host == "https://a.example:6443" and b.configuration.host == "https://b.example:6443"
    assert backend._client("a") is a and backend._client() is not b  # cached per context; default = current


def test_force_is_refused_for_kubernetes_rather_than_dropped() -> None:
    from click.testing import CliRunner

    from launcher.cli import cli

    spec_path = str(Path(__file__).resolve().parents[1] / "examples" / "finetune.yaml")
    result = CliRunner().invoke(cli, ["submit", "--k8s", "--force", spec_path])
    assert result.exit_code == 2 and "--force does not apply to --k8s" in result.output


async def test_report_takes_a_finished_jobs_end_from_the_cluster(kmock: Any) -> None:
    """A job nobody ran `mbl status` on after it finished still counts only up to its end, not up to now."""
    from datetime import datetime, timezone

    from launcher.quota import registry_report_rows
    from launcher.registry import Registry

    backend = backend_for(kmock)
    ref = await submit(backend, pretrain())
    record = Registry().add(ref, team="nlp", kind="pretrain", gpus=16)
    end = record.submitted_at + 1800  # finished half an hour after submission
    job_obj(kmock).patch({"status": {"conditions": [
        {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded", "message": "",
         "lastTransitionTime": datetime.fromtimestamp(end, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}]}})
    since = datetime.fromtimestamp(record.submitted_at - 60).isoformat(timespec="seconds")
    rows = await asyncio.to_thread(registry_report_rows, since, "k8s", lambda r: backend.ended_at(r.ref))
    [row] = rows
    assert abs(row["seconds"] - 1800) <= 1 and row["gpu_hours"] == pytest.approx(8.0, abs=0.01)
    assert Registry().get(ref.name).extra["ended_at"] == pytest.approx(end, abs=1)  # recorded for next time
