"""Kubernetes rendering: every object validates against the CRD of its kind at the CRD's storage version
(never a deprecated one: training-operator v1.9, Kubeflow Trainer v2.3, Kueue v0.19, tests/schemas) or
against the official schemas, and the training operator's admission rules, for each example, 1, 2 and 16
nodes and both APIs; golden files; no `kubernetes` import; secrets by reference only; every path of the
spec on the pod's shared volume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from example_files import JOB_SPECS
from golden_util import check_golden

from launcher.backends import k8s_render as render
from launcher.backends.k8s import K8sBackend
from launcher.errors import UsageError
from launcher.loading import load_spec
from launcher.profile import Profile
from launcher.spec import JobSpec
from launcher.torchrun import launch_command

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "schemas"  # CRDs copied unchanged from ../shared/schemas (see SOURCES.md)
EXAMPLES = ["finetune", "pretrain"]  # the cluster-sized examples: golden files
ALL_EXAMPLES = [p.stem for p in JOB_SPECS]
SUBMIT_DIR = Path("/shared/work")  # the tiny examples' relative paths resolve onto the pods' volume from here
IMAGE = "ghcr.io/mbl-project/mbl-trainer:0.1.0"
K8S_VERSION = "1.33.0"

PROFILE = Profile.model_validate({
    "k8s": {"gpu_types": {
        "h100": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "a100": {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }}
})


# ---- schema checking (also used by test_k8s_manifests.py) -----------------------------------------


@lru_cache(maxsize=None)
def crd_versions() -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(group, kind) -> {version name: that entry of the CRD's spec.versions}, from the CRDs in tests/schemas."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        out[(group, kind)] = {v["name"]: v for v in crd["spec"]["versions"]}
    return out


def crd_version(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The CRD version entry of a custom object; None for a built-in kind. Fails for a version the CRD does
    not serve, does not store, or marks deprecated: mbl writes only what the cluster stores."""
    group, _, version = obj["apiVersion"].rpartition("/")
    versions = crd_versions().get((group, obj["kind"]))
    if versions is None:
        return None
    entry = versions.get(version)
    name = f"{obj['kind']} {obj['metadata'].get('name')}"
    storage = [v for v, e in versions.items() if e.get("storage")]
    assert entry is not None and entry.get("served"), \
        f"{name}: {obj['apiVersion']} is not served by the CRD (served: {sorted(versions)})"
    assert not entry.get("deprecated"), \
        f"{name}: {obj['apiVersion']} is deprecated ({entry.get('deprecationWarning', '')}); use {group}/{storage[0]}"
    assert entry.get("storage"), f"{name}: {obj['apiVersion']} is not the storage version {group}/{storage[0]}"
    return entry


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop (strict field validation rejects them): not in `properties`."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems: list[str] = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props and key in props:
                problems += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                problems.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problems += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return problems


def validate_object(obj: dict[str, Any]) -> None:
    """Core kinds: kubernetes-validate --strict. Custom kinds: the storage version of their CRD, not
    deprecated; its schema; no unknown fields."""
    entry = crd_version(obj)
    if entry is not None:
        schema = entry["schema"]["openAPIV3Schema"]
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
        extra = unknown_fields(obj, schema)
        assert not extra, f"{obj['kind']} {obj['metadata']['name']}: fields unknown to the CRD: {extra}"
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    if job["kind"] == "PyTorchJob":
        return [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    return []


def validate_pod_template(template: dict[str, Any], name: str) -> None:
    """The CRD embeds PodTemplateSpec loosely; check the template as a Pod, strictly."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template["metadata"]},
           "spec": template["spec"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def admission_problems(job: dict[str, Any]) -> list[str]:
    """The training operator v1.9 webhook's rules for a PyTorchJob (../shared/ENVIRONMENT.md)."""
    problems = []
    name = job["metadata"]["name"]
    if not DNS_1035.match(name) or len(name) > 63:
        problems.append(f"name {name!r} is not a DNS-1035 label")
    replicas = job["spec"].get("pytorchReplicaSpecs") or {}
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            problems.append(f"replica type {rtype!r} is not Master or Worker")
        containers = rspec.get("template", {}).get("spec", {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            problems.append(f"{rtype}: no container named pytorch")
        for c in containers:
            if not c.get("image"):
                problems.append(f"{rtype}: container {c.get('name')!r} has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        problems.append("Master replicas must be exactly 1")
    if job["spec"].get("elasticPolicy") and "Worker" not in replicas:
        problems.append("elasticPolicy needs a Worker replica set")
    return problems


# ---- rendering helpers -----------------------------------------------------------------------------


def example(example_name: str, **sets: Any) -> JobSpec:
    """An example as `mbl submit --k8s` resolves it, submitted from SUBMIT_DIR (on the shared storage the PVC
    holds), with an image when the example has none (the tiny ones are made for the local backend)."""
    spec = load_spec(str(REPO / "examples" / f"{example_name}.yaml"), [f"{k}={v}" for k, v in sets.items()])
    if spec.image is None and "image" not in sets:
        spec = spec.model_copy(update={"image": IMAGE})
    return spec.resolved(SUBMIT_DIR)


def with_nodes(spec: JobSpec, nodes: int) -> JobSpec:
    data = spec.model_dump(mode="json")
    data["distributed"]["nodes"] = nodes
    per_step = spec.train.micro_batch_size * nodes * spec.distributed.gpus_per_node
    data["train"]["global_batch_size"] = per_step * max(1, spec.train.global_batch_size // per_step)
    return JobSpec.model_validate(data)


def with_api(spec: JobSpec, api: str) -> JobSpec:
    data = spec.model_dump(mode="json")
    data["k8s"]["api"] = api
    return JobSpec.model_validate(data)


def rendered(spec: JobSpec) -> list[dict[str, Any]]:
    text = K8sBackend(profile=PROFILE).dryrun(spec).files["manifests.yaml"]
    return [d for d in yaml.safe_load_all(text) if d is not None]


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_every_object_validates(name: str, nodes: int, api: str) -> None:
    spec = with_api(with_nodes(example(name), nodes), api)
    objects = rendered(spec)
    assert [o["kind"] for o in objects] == ["ConfigMap", "PyTorchJob" if api == "pytorchjob" else "TrainJob"]
    for obj in objects:
        validate_object(obj)
    job = objects[1]
    if api == "pytorchjob":
        assert admission_problems(job) == []
        for i, template in enumerate(pod_templates(job)):
            validate_pod_template(template, f"{spec.name}-{i}")
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1
        assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
        assert job["spec"]["nprocPerNode"] == str(spec.distributed.gpus_per_node)
    else:
        assert job["spec"]["trainer"]["numNodes"] == nodes
        validate_pod_template(trainjob_pod(job, runtime_manifest()), f"{spec.name}-node-0-0")


def test_admission_checker_catches_each_rule() -> None:
    job = rendered(with_nodes(example("pretrain"), 2))[1]
    assert admission_problems(job) == []
    bad = json.loads(json.dumps(job))
    bad["metadata"]["name"] = "Bad_Name"
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Chief"] = bad["spec"]["pytorchReplicaSpecs"].pop("Worker")
    bad["spec"]["pytorchReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]["name"] = "main"
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"] = json.loads(
        json.dumps(bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]))
    del bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"]
    bad["spec"]["elasticPolicy"] = {"minReplicas": 1}
    problems = " | ".join(admission_problems(bad))
    for words in ("DNS-1035", "exactly 1", "'Chief'", "no container named pytorch", "has no image", "elasticPolicy"):
        assert words in problems


@pytest.mark.parametrize("api_version,kind,words", [
    ("kueue.x-k8s.io/v1beta1", "ClusterQueue", "is deprecated"),
    ("kueue.x-k8s.io/v1beta1", "LocalQueue", "use kueue.x-k8s.io/v1beta2"),
    ("trainer.kubeflow.org/v1beta1", "TrainJob", "not served"),
    ("kubeflow.org/v2", "PyTorchJob", "not served"),
])
def test_version_check_rejects_deprecated_and_unserved_versions(api_version: str, kind: str, words: str) -> None:
    obj = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(AssertionError, match=words):
        validate_object(obj)


def test_crds_are_the_supported_versions() -> None:
    """The vendored CRDs: what docs/kubernetes.md says mbl supports, and what it writes (storage versions)."""
    storage = {(g, k): [v for v, e in vs.items() if e.get("storage")] for (g, k), vs in crd_versions().items()}
    assert storage[("kubeflow.org", "PyTorchJob")] == [render.PYTORCHJOB["version"]]
    assert storage[("trainer.kubeflow.org", "TrainJob")] == [render.TRAINJOB["version"]]
    assert storage[("trainer.kubeflow.org", "ClusterTrainingRuntime")] == ["v1alpha1"]
    for kind in ("ClusterQueue", "LocalQueue", "ResourceFlavor", "Cohort", "WorkloadPriorityClass"):
        assert storage[("kueue.x-k8s.io", kind)] == ["v1beta2"]
        assert crd_versions()[("kueue.x-k8s.io", kind)]["v1beta1"]["deprecated"] is True
    trainjob_spec = crd_versions()[("trainer.kubeflow.org", "TrainJob")]["v1alpha1"]["schema"]["openAPIV3Schema"]
    assert "runtimePatches" in trainjob_spec["properties"]["spec"]["properties"]  # Trainer v2.3
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    for words in ("training-operator v1.9", "Kubeflow Trainer v2.3", "Kueue v0.19", "kueue.x-k8s.io/v1beta2"):
        assert words in docs


def test_schema_check_rejects_unknown_fields() -> None:
    job = rendered(example("finetune"))[1]
    job["spec"]["runPolicy"]["backofLimit"] = 3
    with pytest.raises(AssertionError, match="backofLimit"):
        validate_object(job)


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_golden(name: str, api: str) -> None:
    text = K8sBackend(profile=PROFILE).dryrun(with_api(example(name), api)).files["manifests.yaml"]
    check_golden(f"k8s/{name}-{api}.yaml", text)


def test_pretrain_details() -> None:
    spec = example("pretrain")
    cm, job = rendered(spec)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    ctr = pod["containers"][0]
    # the one launch command of every backend, on the operator's PET_* variables, reading the mounted spec
    assert ctr["name"] == "pytorch"
    assert ctr["command"] == launch_command(spec, "/etc/mbl/spec.yaml", [])
    assert ctr["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "960Gi"}
    assert ctr["resources"]["requests"] == {"nvidia.com/gpu": 8, "cpu": "96", "memory": "960Gi"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert vols["shared"]["persistentVolumeClaim"] == {"claimName": "mbl-shared"}
    assert vols["spec"]["configMap"]["name"] == "mbert-base-pretrain-spec" == cm["metadata"]["name"]
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    assert mounts["spec"] == {"name": "spec", "mountPath": "/etc/mbl", "readOnly": True}
    assert mounts["shared"]["mountPath"] == "/shared" and mounts["dshm"]["mountPath"] == "/dev/shm"
    # the ConfigMap holds the resolved spec the trainer reads, and it round-trips
    assert JobSpec.model_validate(yaml.safe_load(cm["data"]["spec.yaml"])) == spec
    assert list(cm["data"]) == ["spec.yaml"]
    # run policy
    run_policy = job["spec"]["runPolicy"]
    assert run_policy == {"backoffLimit": 3, "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 604800,
                          "activeDeadlineSeconds": 2 * 86400, "suspend": True}
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    # scheduling, identity, security
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["priorityClassName"] == "mbl-batch"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "mbl-trainer"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctr["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                      "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    # labels and Kueue
    for obj in (cm, job):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "mbert-base-pretrain"
        assert labels["app.kubernetes.io/managed-by"] == "mbl"
        assert labels["mbl/team"] == "nlp" and labels["mbl/job"] == "mbert-base-pretrain"
        assert obj["metadata"]["annotations"]["mbl/training-fingerprint"] == spec.training_fingerprint()
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "nlp"
    assert "kueue.x-k8s.io/queue-name" not in cm["metadata"]["labels"]


def test_finetune_pull_secrets_and_no_queue() -> None:
    spec = example("finetune", **{"k8s.queue": "null"})
    job = rendered(spec)[1]
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert pod["priorityClassName"] == "mbl-interactive"
    assert "suspend" not in job["spec"]["runPolicy"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 6 * 3600


def runtime_manifest() -> dict[str, Any]:
    (runtime,) = [d for d in yaml.safe_load_all((REPO / "manifests" / "trainer" / "mbl-torch-runtime.yaml").read_text())
                  if d]
    return runtime


def merged(base: Any, patch: Any) -> Any:
    """A strategic-merge-like patch, as Kubeflow Trainer applies runtimePatches: maps merge key by key, lists
    of named items merge by name (containers, volumes), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch and
            all(isinstance(i, dict) and "name" in i for i in base + patch)):
        by_name = {i["name"]: i for i in base}
        for item in patch:
            by_name[item["name"]] = merged(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return patch


def trainjob_pod(job: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The pod template Kubeflow Trainer makes for node 0 of a TrainJob: the runtime's replicated job `node`,
    patched by the TrainJob's runtimePatches, with the `trainer` fields in the `node` container."""
    (replicated,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
    template = json.loads(json.dumps(replicated["template"]["spec"]["template"]))
    for patch in job["spec"].get("runtimePatches") or []:
        for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rjob["name"] == "node":
                template = merged(template, rjob["template"]["spec"]["template"])
    trainer = job["spec"]["trainer"]
    (node,) = [c for c in template["spec"]["containers"] if c["name"] == "node"]
    node.update({"image": trainer["image"], "command": trainer["command"], "resources": trainer["resourcesPerNode"]})
    node["env"] = [*node.get("env", []), *trainer["env"]]
    return template


def test_trainjob_details() -> None:
    """Kubeflow Trainer v2.3: labels and annotations on the TrainJob's metadata and, through runtimePatches,
    on the JobSet and the pods, which get what the PyTorchJob's pods get."""
    spec = example("pretrain")
    job = rendered(with_api(spec, "trainjob"))[1]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert set(job["spec"]) == {"runtimeRef", "trainer", "runtimePatches", "activeDeadlineSeconds", "suspend"}
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 2 * 86400
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": render.TRAINJOB_RUNTIME}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "nlp"
    assert job["metadata"]["labels"]["mbl/team"] == "nlp"
    assert job["metadata"]["annotations"]["mbl/training-fingerprint"] == spec.training_fingerprint()
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == render.RUNTIME_PATCH_MANAGER
    template = patch["trainingRuntimeSpec"]["template"]
    assert template["metadata"]["labels"]["mbl/job"] == spec.name
    (replicated,) = template["spec"]["replicatedJobs"]
    assert replicated["name"] == render.TRAINJOB_TARGET

    # the pod the Trainer makes from the runtime and the patch: a valid Pod, as the PyTorchJob's pods
    pod = trainjob_pod(job, runtime_manifest())
    validate_pod_template(pod, f"{spec.name}-node-0-0")
    pytorch_pod = rendered(spec)[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert pod["metadata"]["labels"] == {**runtime_manifest()["spec"]["template"]["spec"]["replicatedJobs"][0]
                                         ["template"]["spec"]["template"].get("metadata", {}).get("labels", {}),
                                         **pytorch_pod["metadata"]["labels"]}
    for key in ("serviceAccountName", "terminationGracePeriodSeconds", "securityContext", "volumes", "nodeSelector",
                "tolerations", "automountServiceAccountToken", "enableServiceLinks"):
        assert pod["spec"][key] == pytorch_pod["spec"][key], key
    (node,) = pod["spec"]["containers"]
    (pytorch,) = pytorch_pod["spec"]["containers"]
    for key in ("image", "command", "env", "resources", "securityContext", "volumeMounts", "terminationMessagePolicy"):
        assert node[key] == pytorch[key], key
    # what a TrainJob cannot carry comes from the runtime: the restart rule, no priority class per job
    assert pod["spec"]["restartPolicy"] == "Never" and "priorityClassName" not in pod["spec"]


def test_trainjob_pull_secrets_and_no_queue() -> None:
    job = rendered(with_api(example("finetune", **{"k8s.queue": "null"}), "trainjob"))[1]
    assert "suspend" not in job["spec"] and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    pod = trainjob_pod(job, runtime_manifest())
    assert pod["spec"]["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    assert job["spec"]["activeDeadlineSeconds"] == 6 * 3600


def test_secrets_are_referenced_never_inlined(tmp_path: Path) -> None:
    secret_file = tmp_path / "api-key"
    secret_file.write_text("sk-very-secret-value\n")
    spec = example("pretrain", **{"secrets.WANDB_API_KEY.file": str(secret_file)})
    for api in ("pytorchjob", "trainjob"):
        text = K8sBackend(profile=PROFILE).dryrun(with_api(spec, api)).files["manifests.yaml"]
        assert "sk-very-secret-value" not in text
        job = [d for d in yaml.safe_load_all(text)][1]
        env = (job["spec"]["trainer"]["env"] if api == "trainjob" else
               job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"])
        wandb = [e for e in env if e["name"] == "WANDB_API_KEY"]
        assert wandb == [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}]
        assert all("value" in e or set(e["valueFrom"]) == {"secretKeyRef"} for e in env)


def test_file_only_secret_is_refused() -> None:
    data = example("pretrain").model_dump(mode="json")
    data["secrets"]["WANDB_API_KEY"] = {"file": "~/.config/wandb/api-key"}
    with pytest.raises(UsageError, match="secrets.WANDB_API_KEY") as info:
        K8sBackend(profile=PROFILE).dryrun(JobSpec.model_validate(data))
    assert "secretKeyRef" not in str(info.value) and "secret" in (info.value.hint or "")


@pytest.mark.parametrize("given,expected", [("960G", "960Gi"), ("64G", "64Gi"), ("512M", "512Mi"),
                                            ("2T", "2Ti"), ("100K", "100Ki")])
def test_memory_quantity(given: str, expected: str) -> None:
    assert render.k8s_quantity(given) == expected


def test_usage_errors_say_the_fix() -> None:
    with pytest.raises(UsageError, match="not on the shared volume") as info:
        K8sBackend(profile=PROFILE).dryrun(example("finetune", **{"checkpoint.dir": "/scratch/{name}"}))
    assert "/shared/runs/{name}" in (info.value.hint or "")
    with pytest.raises(UsageError, match="gpu_type 'v100'") as info:
        K8sBackend(profile=PROFILE).dryrun(example("finetune", **{"resources.gpu_type": "v100"}))
    assert "a100, h100" in (info.value.hint or "")
    with pytest.raises(UsageError, match="image"):
        K8sBackend(profile=PROFILE).dryrun(example("finetune", image="null"))


def with_fields(spec: JobSpec, **fields: Any) -> JobSpec:
    """`spec` with dotted fields set as given, not resolved: what a caller of the Python API may pass."""
    data = spec.model_dump(mode="json")
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return JobSpec.model_validate(data)


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_relative_paths_are_refused(api: str) -> None:
    """A pod starts in the image's working directory; the submitter's directory does not exist there."""
    spec = with_api(with_fields(example("finetune"), data__train=["data/sst/train.jsonl"]), api)
    with pytest.raises(UsageError) as info:
        render.render_objects(spec, PROFILE.k8s)
    message, hint = str(info.value), info.value.hint or ""
    assert "data.train[0] is 'data/sst/train.jsonl'" in message and "relative path" in message
    assert "/shared/data/sst/train.jsonl" in hint and "PVC mbl-shared" in hint
    assert info.value.exit_code == 2


@pytest.mark.parametrize("field,value,shown", [
    ("data__prepared", "/data/web-1t", "data.prepared is '/data/web-1t'"),
    ("data__tokenizer", "/home/me/tokenizer", "data.tokenizer is '/home/me/tokenizer'"),
    ("model__init_from", "/opt/models/base", "model.init_from is '/opt/models/base'"),
    ("data__validation", ["/shared/data/ok.jsonl", "/scratch/sst/validation.jsonl"],
     "data.validation[1] is '/scratch/sst/validation.jsonl'"),
    ("data__test", ["/shared/../etc/sst"], "data.test[0] is '/shared/../etc/sst'"),
    ("data__train", ["/data/*/train.jsonl"], "(a pattern, checked by its directory '/data')"),
    ("data__train", ["/home/me/sst-datasets-folder"], "data.train[0] is '/home/me/sst-datasets-folder'"),
])
def test_paths_outside_the_volume_are_refused(field: str, value: Any, shown: str) -> None:
    spec = with_fields(example("finetune"), **{field: value})
    with pytest.raises(UsageError, match="not on the shared volume mounted at /shared") as info:
        K8sBackend(profile=PROFILE).dryrun(spec)
    assert shown in str(info.value)
    assert "under /shared" in (info.value.hint or "")


def test_paths_on_the_volume_pass_globs_by_their_directory() -> None:
    spec = with_fields(example("finetune"), data__train=["/shared/data/sst/train-*.jsonl", "/shared/data/sst-ds"],
                       data__tokenizer="/shared/tokenizers/mbert", data__prepared="/shared/data/prepared/")
    assert [o["kind"] for o in rendered(spec)] == ["ConfigMap", "PyTorchJob"]
    moved = with_fields(example("finetune", **{"k8s.mount_path": "/mnt/team", "checkpoint.dir": "/mnt/team/runs/{name}"}),
                        data__train=["/mnt/team/sst/*.jsonl"], data__validation=[], data__test=[],
                        model__init_from="/mnt/team/runs/base")
    assert rendered(moved)[1]["kind"] == "PyTorchJob"
    with pytest.raises(UsageError, match="data.test"):
        rendered(with_fields(moved, data__test=["/shared/data/sst/test.jsonl"]))


def test_every_bad_path_is_named_at_once() -> None:
    spec = with_fields(example("finetune"), data__train=["train.jsonl"], model__init_from="/models/base")
    with pytest.raises(UsageError, match="2 paths of the spec are not visible in the pod") as info:
        rendered(spec)
    assert "data.train[0] is 'train.jsonl'" in str(info.value)
    assert "model.init_from is '/models/base'" in str(info.value)


def test_cli_refuses_a_relative_data_path(mbl_env: dict[str, str], tmp_path: Path) -> None:
    """`mbl render --k8s` resolves relative paths against the submit directory, as for checkpoint.dir;
    that directory is not on the pod's volume, so the path is refused, with exit code 2 and the fix."""
    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "examples" / "finetune.yaml").read_text().replace(
        "train: [/shared/data/sst/train.jsonl]", "train: [data/sst/train.jsonl]"))
    out = subprocess.run(["mbl", "render", "--k8s", str(spec)], capture_output=True, text=True, env=mbl_env,
                         cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"data.train[0] is '{tmp_path}/data/sst/train.jsonl'" in out.stderr
    assert "not on the shared volume mounted at /shared" in out.stderr and "fix: " in out.stderr
    assert out.stdout == ""


def test_names_stay_valid_at_the_longest() -> None:
    name = "a" * 40
    spec = with_nodes(example("pretrain", name=name), 16)
    cm, job = rendered(spec)
    for n in (cm["metadata"]["name"], render.pod_name(name, 15), f"{name}-worker-14"):
        assert DNS_1035.match(n) and len(n) <= 63


def test_render_is_pure_and_does_not_import_kubernetes(mbl_env: dict[str, str], tmp_path: Path) -> None:
    code = (
        "import sys, socket, subprocess, time\n"
        "def _no(*a, **k): raise AssertionError('rendering must not touch the network or a subprocess')\n"
        "socket.socket.connect = _no; subprocess.Popen.__init__ = _no\n"
        "from launcher.loading import load_spec\n"
        "from launcher.backends import get_backend\n"
        f"spec = load_spec({str(REPO / 'examples' / 'pretrain.yaml')!r}, []).resolved()\n"
        "before = spec.model_dump()\n"
        "text = get_backend('k8s').dryrun(spec).files['manifests.yaml']\n"
        "assert spec.model_dump() == before, 'dryrun changed the spec'\n"
        "assert 'PyTorchJob' in text\n"
        "assert 'kubernetes' not in sys.modules, sorted(m for m in sys.modules if m.startswith('kube'))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mbl_env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_render_is_kubectl_ready(mbl_env: dict[str, str], tmp_path: Path) -> None:
    """`mbl render --k8s examples/finetune.yaml | kubectl apply -f -`: multi-document YAML that validates."""
    out = subprocess.run(["mbl", "render", "--k8s", str(REPO / "examples" / "finetune.yaml")],
                         capture_output=True, text=True, env=mbl_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# ") and "\n---\n" in out.stdout
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    for doc in docs:
        validate_object(doc)
    assert admission_problems(docs[1]) == []
