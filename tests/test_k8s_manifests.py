"""manifests/: kustomize bases that list every file, build, validate (custom kinds at their CRD's storage
version, never a deprecated one: Kueue v1beta2, Trainer v2.3), and grant what the backend uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_k8s_render import example, validate_object

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "manifests"
TRAINER = BASE / "trainer"  # a base of its own, for k8s.api: trainjob
BASES = [BASE, TRAINER]


def objects(base: Path = BASE) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        out += [d for d in yaml.safe_load_all((base / name).read_text()) if d]
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_kustomization_lists_every_file(base: Path) -> None:
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = sorted(p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files


def test_every_yaml_file_is_in_a_base() -> None:
    listed = {b / name for b in BASES for name in yaml.safe_load((b / "kustomization.yaml").read_text())["resources"]}
    files = {p for p in BASE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed


@pytest.mark.parametrize("obj", [o for b in BASES for o in objects(b)],
                         ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_object_validates(obj: dict[str, Any]) -> None:
    validate_object(obj)


def test_cluster_queues_keep_kueues_own_rules() -> None:
    """Two of the ClusterQueue CRD's CEL rules (x-kubernetes-validations), which jsonschema does not run."""
    for name, cq in by_kind("ClusterQueue").items():
        for group in cq["spec"]["resourceGroups"]:
            for flavor in group["flavors"]:
                assert len(flavor["resources"]) == len(group["coveredResources"]), name
                if "cohortName" not in cq["spec"]:
                    assert not any("borrowingLimit" in r for r in flavor["resources"]), name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in built) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in objects())


def test_what_the_examples_need_exists() -> None:
    namespaces, pvcs, sas = by_kind("Namespace"), by_kind("PersistentVolumeClaim"), by_kind("ServiceAccount")
    priorities, local_queues = by_kind("PriorityClass"), by_kind("LocalQueue")
    cluster_queues = by_kind("ClusterQueue")
    for name in ("pretrain", "finetune"):
        k8s = example(name).k8s
        assert k8s.namespace in namespaces
        assert pvcs[k8s.pvc]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert k8s.service_account in sas
        assert k8s.priority_class in priorities
        queue = local_queues[k8s.queue]
        assert queue["metadata"]["namespace"] == k8s.namespace
        assert queue["spec"]["clusterQueue"] in cluster_queues
    assert set(local_queues) == {"nlp", "vision"}
    assert set(priorities) == {"mbl-batch", "mbl-interactive"}
    assert by_kind("ServiceAccount")["mbl-trainer"]["automountServiceAccountToken"] is False


def test_gpu_quota_per_team() -> None:
    quota = by_kind("ResourceQuota")["mbl-gpu"]
    total = int(quota["spec"]["hard"]["requests.nvidia.com/gpu"])
    gpus = {}
    for name, cq in by_kind("ClusterQueue").items():
        group = cq["spec"]["resourceGroups"][0]
        assert "nvidia.com/gpu" in group["coveredResources"]
        for flavor in group["flavors"]:
            assert flavor["name"] in by_kind("ResourceFlavor")
            gpus[name] = sum(r["nominalQuota"] for r in flavor["resources"] if r["name"] == "nvidia.com/gpu")
    assert set(gpus) == {"mbl-nlp", "mbl-vision"} and sum(gpus.values()) == total


def test_rbac_grants_what_the_backend_calls() -> None:
    role = by_kind("Role")["mbl-launcher"]
    grants = {(group, res, verb) for rule in role["rules"] for group in rule["apiGroups"]
              for res in rule["resources"] for verb in rule["verbs"]}
    needed = {
        ("kubeflow.org", "pytorchjobs", "create"), ("kubeflow.org", "pytorchjobs", "get"),
        ("kubeflow.org", "pytorchjobs", "delete"),
        ("trainer.kubeflow.org", "trainjobs", "create"), ("trainer.kubeflow.org", "trainjobs", "get"),
        ("trainer.kubeflow.org", "trainjobs", "delete"),
        ("", "configmaps", "create"), ("", "configmaps", "patch"), ("", "configmaps", "delete"),
        ("", "pods", "list"), ("", "pods", "get"), ("", "pods/log", "get"),
    }
    assert needed <= grants, needed - grants
    assert not any(v in ("*", "escalate", "bind", "impersonate") for _g, _r, v in grants)
    binding = by_kind("RoleBinding")["mbl-launcher"]
    assert binding["roleRef"]["name"] == "mbl-launcher"


def test_namespace_enforces_restricted_pod_security() -> None:
    labels = by_kind("Namespace")["mbl"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_trainer_runtime() -> None:
    """The ClusterTrainingRuntime mbl's TrainJobs reference: valid for Trainer v2.3 (test_every_object_validates),
    its Job template also valid as a strict batch/v1 Job, and the restart rule the launcher's exit codes need."""
    (runtime,) = objects(TRAINER)
    from launcher.backends import k8s_render as render

    assert runtime["kind"] == "ClusterTrainingRuntime" and runtime["metadata"]["name"] == render.TRAINJOB_RUNTIME
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}  # v2.3: numProcPerNode is the TrainJob's
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == render.TRAINJOB_TARGET
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "mbl-torch-node", **replicated["template"]["metadata"]},
           "spec": replicated["template"]["spec"]}
    validate_object(job)
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [render.TRAINJOB_CONTAINER]
    rule = job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]
    assert render.RETRYABLE_EXIT_CODE in rule["values"] and rule["operator"] == "NotIn"
