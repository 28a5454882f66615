"""Live team GPU use on Kubernetes (launcher.quota_k8s.k8s_usage) against kmock, and GPU-hours of k8s jobs
from the registry (launcher.quota.registry_report_rows).

The cluster holds what `mbl quota render` and `mbl submit --k8s` make (quota_k8s.k8s_objects: Kueue
v1beta2; the rendered PyTorchJobs), with the status the controllers would give them. As in test_k8s_client.py, the server runs on
the test's event loop, so every client call goes through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from datetime import datetime
from typing import Any

import pytest

from launcher.backends import k8s_render as render
from launcher.backends.base import JobRef
from launcher.errors import BackendError
from launcher.quota import QuotaPolicy, aggregate, registry_report_rows, show_rows
from launcher.quota_k8s import TEAM_LABEL, K8sUsage, job_gpus, k8s_objects, k8s_usage, k8s_yaml, pod_gpus
from test_k8s_client import status_body
from test_k8s_render import PROFILE, example, validate_object

kubernetes = pytest.importorskip("kubernetes")
kmock_lib = pytest.importorskip("kmock")

JOBS = "kubeflow.org/v1/pytorchjobs"
CQS = "kueue.x-k8s.io/v1beta2/clusterqueues"
CQ_PATH = "/apis/kueue.x-k8s.io/v1beta2/clusterqueues"

POLICY = QuotaPolicy.model_validate({"teams": {"nlp": {"gpus": 32, "queues": ["nlp"]},
                                               "vision": {"gpus": 24}}})


def config(kmock: Any) -> Any:
    cfg = kubernetes.client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    return cfg


async def usage_of(kmock: Any, policy: QuotaPolicy = POLICY) -> dict[str, K8sUsage]:
    return await asyncio.to_thread(k8s_usage, policy, configuration=config(kmock))


def add_job(kmock: Any, example_name: str, name: str, team: str, ns: str, *conditions: str,
            suspend: bool = False) -> dict[str, Any]:
    """A PyTorchJob as `mbl submit --k8s` renders it, with the status the operator / Kueue give it."""
    spec = example(example_name, name=name, team=team, **{"k8s.namespace": ns, "k8s.queue": team})
    job = render.render_objects(spec, PROFILE.k8s)[-1]
    job["spec"]["runPolicy"]["suspend"] = suspend
    job["status"] = {"conditions": [{"type": c, "status": "True"} for c in conditions]}
    kmock.objects[(JOBS, ns, name)] = job
    return job


def add_pod(kmock: Any, job: dict[str, Any], replica: str, index: int, phase: str) -> None:
    """A pod of the job as the training operator creates it: the replica's template, the job-name label."""
    template = job["spec"]["pytorchReplicaSpecs"][replica]["template"]
    meta = job["metadata"]
    name = f"{meta['name']}-{replica.lower()}-{index}"
    kmock.objects[("v1/pods", meta["namespace"], name)] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": meta["namespace"],
                     "labels": {**template["metadata"]["labels"], "training.kubeflow.org/job-name": meta["name"]}},
        "spec": template["spec"], "status": {"phase": phase},
    }


def seed_policy_objects(kmock: Any, policy: QuotaPolicy, quotas_of: tuple[str, ...]) -> None:
    """The ClusterQueues of `mbl quota apply`, and the ResourceQuotas of the teams in `quotas_of` only."""
    for obj in k8s_objects(policy):
        meta = obj["metadata"]
        if obj["kind"] == "ClusterQueue":
            kmock.objects[(CQS, None, meta["name"])] = obj
        elif obj["kind"] == "ResourceQuota" and meta["labels"][TEAM_LABEL] in quotas_of:
            kmock.objects[("v1/resourcequotas", meta["namespace"], meta["name"])] = obj


@pytest.fixture
def cluster(kmock: Any) -> Any:
    """nlp: its own ResourceQuota; one 16-GPU pretrain running (both pods), one 4-GPU finetune held back by
    Kueue, one finished. vision: no ResourceQuota; a pretrain admitted with only its master pod created
    (Pending), a finetune held back, a notebook pod without labels, a finished pod."""
    for resource in ("v1/pods", "v1/resourcequotas", JOBS, CQS):
        kmock.resources[resource] = {}
    seed_policy_objects(kmock, POLICY, quotas_of=("nlp",))
    kmock.objects[("v1/resourcequotas", "nlp", "gpu-quota-nlp")].patch({"status": {
        "hard": {"requests.nvidia.com/gpu": "32"}, "used": {"requests.nvidia.com/gpu": "16"}}})
    kmock.objects[(CQS, None, "team-nlp")].patch({"status": {
        "pendingWorkloads": 1, "admittedWorkloads": 1,
        "flavorsReservation": [{"name": "default-gpu", "resources": [{"name": "nvidia.com/gpu", "total": "16"}]}],
        "flavorsUsage": [{"name": "default-gpu", "resources": [{"name": "nvidia.com/gpu", "total": "16"}]}]}})

    running = add_job(kmock, "pretrain", "nlp-pretrain", "nlp", "nlp", "Created", "Running")
    add_pod(kmock, running, "Master", 0, "Running")
    add_pod(kmock, running, "Worker", 0, "Running")
    add_job(kmock, "finetune", "nlp-sst", "nlp", "nlp", "Created", "Suspended", suspend=True)
    add_job(kmock, "finetune", "nlp-old", "nlp", "nlp", "Created", "Succeeded")

    admitted = add_job(kmock, "pretrain", "vision-pretrain", "vision", "vision", "Created")
    add_pod(kmock, admitted, "Master", 0, "Pending")
    add_job(kmock, "finetune", "vision-sst", "vision", "vision", "Created", "Suspended", suspend=True)
    kmock.objects[("v1/pods", "vision", "notebook")] = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "notebook", "namespace": "vision"},
        "spec": {"containers": [{"name": "jupyter", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Running"}}
    kmock.objects[("v1/pods", "vision", "old-eval")] = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "old-eval", "namespace": "vision"},
        "spec": {"containers": [{"name": "eval", "resources": {"requests": {"nvidia.com/gpu": 2}}}]},
        "status": {"phase": "Succeeded"}}
    return kmock


# ---- pure pieces -----------------------------------------------------------------------------------


def test_gpus_of_rendered_jobs_and_pods() -> None:
    job = render.render_objects(example("pretrain"), PROFILE.k8s)[-1]
    assert job_gpus(job) == 16  # Master 1 + Worker 1, 8 GPUs each
    assert job_gpus(render.render_objects(example("finetune"), PROFILE.k8s)[-1]) == 4
    assert pod_gpus({"containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}},
                                    {"resources": {"requests": {"nvidia.com/gpu": 1}}}],
                     "initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}]}) == 4
    assert pod_gpus({"containers": [{"name": "cpu-only"}]}) == 0


def test_policy_objects_validate_at_kueues_storage_version() -> None:
    """`mbl quota render --k8s`: ResourceQuotas strictly, Kueue objects against the v0.19 CRDs' v1beta2 (the
    storage version; v1beta1 is deprecated there), plus the ClusterQueue CEL rule jsonschema cannot run."""
    import yaml

    text = k8s_yaml(POLICY)
    objects = [o for o in yaml.safe_load_all(text) if o]
    assert objects == k8s_objects(POLICY)
    for obj in objects:
        validate_object(obj)
    kinds = {(o["apiVersion"], o["kind"]) for o in objects}
    assert kinds == {("v1", "ResourceQuota"), ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"),
                     ("kueue.x-k8s.io/v1beta2", "ClusterQueue"), ("kueue.x-k8s.io/v1beta2", "LocalQueue")}
    queues = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterQueue"}
    assert set(queues) == {"team-nlp", "team-vision"}
    for cq in queues.values():
        # "borrowingLimit must be nil when cohort is empty": v1beta2 names the field cohortName
        assert cq["spec"]["cohortName"] == "mbl" and "cohort" not in cq["spec"]
        (flavor,) = cq["spec"]["resourceGroups"][0]["flavors"]
        assert len(flavor["resources"]) == len(cq["spec"]["resourceGroups"][0]["coveredResources"])
    local = {(o["metadata"]["namespace"], o["metadata"]["name"]): o["spec"]["clusterQueue"] for o in objects
             if o["kind"] == "LocalQueue"}
    assert local == {("nlp", "nlp"): "team-nlp", ("vision", "vision"): "team-vision"}


# ---- live use --------------------------------------------------------------------------------------


async def test_usage_per_team(cluster: Any) -> None:
    usage = await usage_of(cluster)
    nlp, vision = usage["nlp"], usage["vision"]

    # nlp: running from its ResourceQuota, pending = the suspended finetune, limit = the quota's hard.
    assert (nlp.running, nlp.pending, nlp.limit, nlp.jobs) == (16, 4, 32, 2)
    assert nlp.sources["running"] == "ResourceQuota nlp/gpu-quota-nlp status.used[requests.nvidia.com/gpu]"
    assert nlp.sources["limit"] == "ResourceQuota nlp/gpu-quota-nlp hard[requests.nvidia.com/gpu]"
    assert any("1 workload(s) pending, 1 admitted holding 16 GPU(s)" in n for n in nlp.notes)

    # vision: no ResourceQuota: running = its pods (master 8 + unlabelled notebook 1; the finished pod not),
    # pending = the worker not created yet (8) + the suspended finetune (4), limit = Kueue's nominal quota.
    assert (vision.running, vision.pending, vision.limit, vision.jobs) == (9, 12, 24, 2)
    assert vision.sources["limit"] == "ClusterQueue team-vision nominalQuota[nvidia.com/gpu]"
    assert any("no ResourceQuota" in n and "namespace vision" in n for n in vision.notes)

    rows = {r["team"]: r for r in show_rows(POLICY, usage)}
    assert rows["nlp"]["in_use"] == 20 and rows["nlp"]["free"] == 12
    assert rows["vision"]["in_use"] == 21 and rows["vision"]["free"] == 3

    paths = {r.url.path for r in cluster}
    assert {"/api/v1/namespaces/nlp/resourcequotas", "/api/v1/namespaces/vision/pods",
            "/apis/kubeflow.org/v1/namespaces/nlp/pytorchjobs", CQ_PATH} <= paths
    assert all(r.method == "GET" for r in cluster)  # it only reads


async def test_quota_without_status_falls_back_to_pods(cluster: Any) -> None:
    cluster.objects[("v1/resourcequotas", "nlp", "gpu-quota-nlp")] = k8s_objects(POLICY)[1]  # no status yet
    nlp = (await usage_of(cluster))["nlp"]
    assert (nlp.running, nlp.limit) == (16, 32)  # the two running pods; hard from the quota's spec
    assert any("has no status yet" in n for n in nlp.notes)


async def test_no_kueue_still_gives_resourcequota_numbers(cluster: Any) -> None:
    cluster[f"get {CQ_PATH}"] << 404 << status_body(404, "NotFound",
                                                   "the server could not find the requested resource")
    usage = await usage_of(cluster)
    nlp, vision = usage["nlp"], usage["vision"]
    assert (nlp.running, nlp.pending, nlp.limit, nlp.jobs) == (16, 4, 32, 2)
    assert (vision.running, vision.pending, vision.limit) == (9, 12, None)  # no quota anywhere: no limit
    assert any("Kueue is not installed" in n for n in nlp.notes)
    assert show_rows(POLICY, usage)[1]["limit"] == 24  # the policy's number still bounds the row


async def test_clusterqueues_forbidden_is_a_note(cluster: Any) -> None:
    cluster[f"get {CQ_PATH}"] << 403 << status_body(403, "Forbidden", "clusterqueues.kueue.x-k8s.io is forbidden")
    nlp = (await usage_of(cluster))["nlp"]
    assert (nlp.running, nlp.limit) == (16, 32)
    assert any("not allowed to list clusterqueues.kueue.x-k8s.io" in n for n in nlp.notes)


async def test_no_training_operator(cluster: Any) -> None:
    for ns in ("nlp", "vision"):
        cluster[f"get /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"] << 404 << status_body(
            404, "NotFound", "the server could not find the requested resource")
    nlp = (await usage_of(cluster))["nlp"]
    assert (nlp.running, nlp.pending, nlp.jobs) == (16, 0, 0)
    assert any("training operator not installed" in n for n in nlp.notes)


async def test_forbidden_names_verb_and_resource(cluster: Any) -> None:
    message = ('resourcequotas is forbidden: User "alice" cannot list resource "resourcequotas" in API group "" '
               'in the namespace "nlp"')
    cluster["get /api/v1/namespaces/nlp/resourcequotas"] << 403 << status_body(403, "Forbidden", message)
    with pytest.raises(BackendError) as info:
        await usage_of(cluster)
    assert str(info.value).startswith("forbidden: you may not list resourcequotas in namespace 'nlp'")
    assert "`list` on resourcequotas" in (info.value.hint or "")


async def test_shared_namespace_counts_by_team_label(kmock: Any) -> None:
    """Two teams in one namespace: its ResourceQuota counts both, so each team's running comes from its pods."""
    policy = QuotaPolicy.model_validate({"teams": {"nlp": {"gpus": 16, "namespace": "mbl"},
                                                   "vision": {"gpus": 8, "namespace": "mbl"}}})
    for resource in ("v1/pods", "v1/resourcequotas", JOBS, CQS):
        kmock.resources[resource] = {}
    seed_policy_objects(kmock, policy, quotas_of=("nlp", "vision"))
    for name in ("gpu-quota-nlp", "gpu-quota-vision"):
        kmock.objects[("v1/resourcequotas", "mbl", name)].patch({"status": {"used": {"requests.nvidia.com/gpu": "12"}}})
    job = add_job(kmock, "pretrain", "p", "nlp", "mbl", "Created", "Running")
    add_pod(kmock, job, "Master", 0, "Running")
    add_pod(kmock, job, "Worker", 0, "Running")
    add_job(kmock, "finetune", "f", "vision", "mbl", "Created", "Suspended", suspend=True)
    usage = await usage_of(kmock, policy)
    assert (usage["nlp"].running, usage["nlp"].pending, usage["nlp"].limit, usage["nlp"].jobs) == (16, 0, 16, 1)
    assert (usage["vision"].running, usage["vision"].pending, usage["vision"].limit) == (0, 4, 8)
    assert any("shared by teams nlp, vision" in n for n in usage["vision"].notes)


async def test_unreachable_cluster() -> None:
    cfg = kubernetes.client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: connection refused
    cfg.retries = 0
    with pytest.raises(BackendError, match=r"cannot reach the Kubernetes API at http://127.0.0.1:9"):
        await asyncio.to_thread(k8s_usage, POLICY, configuration=cfg)


# ---- reports from the registry ---------------------------------------------------------------------


def test_registry_report_rows_for_k8s_jobs() -> None:
    from launcher.registry import Registry

    reg = Registry()

    def add(name: str, team: str, gpus: int, hours: float | None, backend: str = "k8s") -> Any:
        record = reg.add(JobRef(backend, f"{team}/{name}", name, f"/shared/runs/{name}", {"namespace": team}),
                         team=team, kind="pretrain", gpus=gpus)
        if hours is not None:
            reg.save_extra(record, {**record.extra, "ended_at": record.submitted_at + hours * 3600})
        return record

    add("a", "nlp", 16, 2.0)      # 32 GPU-hours
    add("b", "nlp", 4, 0.5)       # 2
    add("c", "vision", 8, 1.5)    # 12
    add("live", "vision", 2, None)  # still running: submit to now, about 0 here
    add("s", "nlp", 8, 10.0, backend="slurm")  # another backend: not in the k8s report
    old = add("old", "nlp", 8, 1.0)
    with reg._db:  # submitted before the report's start
        reg._db.execute("UPDATE jobs SET submitted_at = ? WHERE id = ?", (time.time() - 3 * 86400, old.id))

    since = datetime.fromtimestamp(time.time() - 86400).isoformat(timespec="seconds")
    rows = registry_report_rows(since)
    by_job = {r["name"]: r for r in rows}
    assert set(by_job) == {"a", "b", "c", "live"}
    assert (by_job["a"]["seconds"], by_job["a"]["gpu_hours"], by_job["a"]["team"]) == (7200, 32.0, "nlp")
    assert by_job["live"]["gpu_hours"] < 0.01
    totals = {r["team"]: r for r in aggregate(rows, "team")}
    assert totals["nlp"] == {"team": "nlp", "jobs": 2, "gpu_hours": 34.0}
    assert totals["vision"]["jobs"] == 2 and totals["vision"]["gpu_hours"] == pytest.approx(12.0, abs=0.01)
    assert [r["team"] for r in aggregate(rows, "team")] == ["nlp", "vision"]  # most GPU-hours first


def test_one_team_label_key_on_jobs_and_quota_objects() -> None:
    """The label that names a team is the same on the objects `mbl submit` makes and those of a quota policy."""
    from launcher.backends.k8s_render import labels
    from launcher.loading import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "finetune.yaml")
    assert labels(spec)[TEAM_LABEL] == spec.team
    for obj in k8s_objects(POLICY):
        keys = set((obj["metadata"].get("labels") or {}))
        assert not any(k.endswith("/team") and k != TEAM_LABEL for k in keys), obj["metadata"]
        if obj["kind"] in ("ResourceQuota", "ClusterQueue", "LocalQueue"):
            assert obj["metadata"]["labels"][TEAM_LABEL] in POLICY.teams
