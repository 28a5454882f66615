"""Kubernetes rendering: every object validates against the official schemas and the training operator's
admission rules, for each example and 1, 2 and 16 nodes; golden files; no `kubernetes` import; secrets
by reference only; the launch wrapper maps exit codes as the operator's ExitCode policy needs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from golden_util import check_golden
from launcher.backends import k8s_render as render
from launcher.backends.k8s import K8sBackend
from launcher.errors import UsageError
from launcher.loading import load_spec
from launcher.profile import Profile
from launcher.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "schemas"  # CRDs copied unchanged from ../shared/schemas (see SOURCES.md)
EXAMPLES = ["finetune", "pretrain"]
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
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from the CRDs in tests/schemas."""
    out = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


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
    """Core kinds: kubernetes-validate --strict. Custom kinds: the CRD's schema plus no unknown fields."""
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas():
        schema = crd_schemas()[key]
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
    spec = load_spec(str(REPO / "examples" / f"{example_name}.yaml"), [f"{k}={v}" for k, v in sets.items()])
    return spec.resolved()


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
@pytest.mark.parametrize("name", EXAMPLES)
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
    # torchrun (through the exit-code wrapper) on the operator's PET_* variables, reading the mounted spec
    assert ctr["name"] == "pytorch"
    assert ctr["command"] == ["python", "/etc/mbl/launch.py", "--nproc-per-node=8", "-m", "jobs.train",
                              "--spec", "/etc/mbl/spec.yaml"]
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
    assert cm["data"]["launch.py"] == render.LAUNCH_PY
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


def test_trainjob_details() -> None:
    job = rendered(with_api(example("pretrain"), "trainjob"))[1]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "nlp"
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    override = job["spec"]["podSpecOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    assert {v["name"] for v in override["volumes"]} == {"shared", "spec", "dshm"}
    assert override["containers"][0]["name"] == "node"


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
        "from launcher.backends.base import get_backend\n"
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


def _launch(tmp_path: Path, mode: str, term: bool = False) -> tuple[int, str]:
    (tmp_path / "launch.py").write_text(render.LAUNCH_PY)
    (tmp_path / "worker.py").write_text(
        "import os, signal, sys, time\n"
        "mode = os.environ['MODE']\n"
        "if mode == 'fail': sys.exit(3)\n"
        "if mode == 'requeue': sys.exit(75 if os.environ['RANK'] == '0' else 0)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))  # the trainer saves, then 'requeue me'\n"
        "open(f\"ready{os.environ['RANK']}\", 'w').close()\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "MODE": mode, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "launch.py", "--standalone", "--nproc-per-node=2", "worker.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if term:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    return proc.returncode, err


@pytest.mark.parametrize("mode,term,code", [("fail", False, 1), ("requeue", False, 143), ("sleep", True, 143)])
def test_launch_wrapper_maps_exit_codes(tmp_path: Path, mode: str, term: bool, code: int) -> None:
    """torchrun alone exits 1 for any worker failure; the operator retries only codes >= 128."""
    pytest.importorskip("torch")
    rc, err = _launch(tmp_path, mode, term)
    assert rc == code, err[-2000:]
    assert "mbl launch:" in err
