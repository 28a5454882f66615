"""Kubernetes rendering, pure: a JobSpec (+ cluster profile) -> the objects `mbl submit --k8s` creates.

No network, no clock, no subprocess, no `import kubernetes`: `mbl render --k8s` works on a laptop and
prints exactly what `submit` sends. Two objects per job:

- a ConfigMap `<name>-spec` holding the resolved spec (`spec.yaml`),
  mounted read-only at /etc/mbl;
- the job: a kubeflow.org/v1 PyTorchJob (training-operator v1.9; Master = node 0, Workers = nodes 1..N-1),
  or with `k8s.api: trainjob` a Kubeflow Trainer v2.3 TrainJob (trainer.kubeflow.org/v1alpha1).

Every path the job reads or writes must be one the pod sees, under `k8s.mount_path` (launcher/paths.py).

Each pod runs `python -m jobs.launch` (the one launch command of every backend, launcher/torchrun.py):
torchrun reads the operator's PET_* variables, and jobs.launch exits 0 (done), 143 (requeue: the ranks saved
on a SIGTERM from Kubernetes, or a crash after progress with k8s.max_restarts left), which the operator's
`restartPolicy: ExitCode` retries as >= 128, or 1 (failed for good), which it does not. The reason is the
container's termination message.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from launcher.contract import LAUNCH_REQUEUE, SPEC_FILE
from launcher.errors import UsageError
from launcher.paths import check_k8s
from launcher.profile import GpuType, K8sProfile
from launcher.spec import JobSpec
from launcher.torchrun import launch_command

# ---- constants other code (status, logs, tests, docs) relies on ----------------------------------

PYTORCHJOB = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs", "kind": "PyTorchJob"}
TRAINJOB = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "plural": "trainjobs", "kind": "TrainJob"}
APIS = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}

CONTAINER = "pytorch"  # the training operator requires a container of this name
TRAINJOB_CONTAINER = "node"  # the trainer container of Kubeflow Trainer's torch runtimes
TRAINJOB_TARGET = "node"  # the replicated job of those runtimes that runs the trainer
TRAINJOB_RUNTIME = "mbl-torch"  # ClusterTrainingRuntime shipped in manifests/trainer/ (see docs/kubernetes.md)
RUNTIME_PATCH_MANAGER = "mbl/launcher"  # owner of the TrainJob's runtimePatches entry
SPEC_DIR = "/etc/mbl"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
MASTER_PORT = 23456  # the operator's default port name/number, written out so that the render is stable
RETRYABLE_EXIT_CODE = LAUNCH_REQUEUE  # >= 128: the operator's ExitCode policy restarts the pod
RUN_AS_USER = 1000

LABEL_PREFIX = "mbl"
TEAM_LABEL = f"{LABEL_PREFIX}/team"
JOB_LABEL = f"{LABEL_PREFIX}/job"
FINGERPRINT_ANNOTATION = f"{LABEL_PREFIX}/training-fingerprint"
KIND_ANNOTATION = f"{LABEL_PREFIX}/kind"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


_MEMORY = re.compile(r"^(\d+)([KMGT])$")


def k8s_quantity(slurm_memory: str) -> str:
    """Slurm-style memory ("960G", binary units) -> a Kubernetes quantity ("960Gi")."""
    match = _MEMORY.match(slurm_memory)
    if not match:
        raise UsageError(f"memory {slurm_memory!r} is not a number and a unit K, M, G or T",
                         hint="write it like 480G")
    return f"{match.group(1)}{match.group(2)}i"


def spec_configmap_name(name: str) -> str:
    return f"{name}-spec"


def pod_name(name: str, node_rank: int) -> str:
    """The PyTorchJob pod of a node rank: the Master is node 0, Worker i is node i + 1."""
    return f"{name}-master-0" if node_rank == 0 else f"{name}-worker-{node_rank - 1}"


# ---- pieces ---------------------------------------------------------------------------------------


def labels(spec: JobSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "mbl-trainer",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": str(spec.kind),
        "app.kubernetes.io/part-of": "mbl",
        "app.kubernetes.io/managed-by": "mbl",
        TEAM_LABEL: spec.team,
        JOB_LABEL: spec.name,
    }


def annotations(spec: JobSpec) -> dict[str, str]:
    return {FINGERPRINT_ANNOTATION: spec.training_fingerprint(), KIND_ANNOTATION: str(spec.kind)}


def _metadata(spec: JobSpec, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": spec.k8s.namespace,
        "labels": {**labels(spec), **(extra_labels or {})},
        "annotations": annotations(spec),
    }


def gpu_type(spec: JobSpec, profile: K8sProfile) -> GpuType:
    """The profile's scheduling facts for resources.gpu_type (plain nvidia.com/gpu when none is set)."""
    wanted = spec.resources.gpu_type
    if wanted is None or not profile.gpu_types:
        return GpuType()
    if wanted not in profile.gpu_types:
        raise UsageError(
            f"resources.gpu_type {wanted!r} is not in the cluster profile's k8s.gpu_types",
            hint=f"use one of {', '.join(sorted(profile.gpu_types))}, or add it to the profile (--profile)",
        )
    return profile.gpu_types[wanted]


def container_env(spec: JobSpec) -> list[dict[str, Any]]:
    """Plain variables, then secrets, always by reference (secretKeyRef), never by value."""
    env: list[dict[str, Any]] = [
        {"name": "MBL_JOB_NAME", "value": spec.name},
        {"name": "MBL_RUN_DIR", "value": spec.run_dir},
        {"name": "MBL_BACKEND", "value": "k8s"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MBL_JOB_ID", "value": f"k8s:{spec.k8s.namespace}/{spec.name}"},
    ]
    taken = {e["name"] for e in env}
    for key, value in sorted(spec.env.items()):
        if key in taken:
            raise UsageError(f"env.{key} is set by mbl on Kubernetes", hint=f"remove env.{key} from the spec")
        env.append({"name": key, "value": value})
    for key, ref in sorted(spec.secrets.items()):
        if key in taken or key in spec.env:
            raise UsageError(f"secrets.{key} clashes with an environment variable of the same name",
                             hint=f"remove env.{key} or secrets.{key}")
        if not (ref.secret and ref.key):
            raise UsageError(
                f"secrets.{key} names no Kubernetes Secret (only a file, which pods cannot read)",
                hint=f"add secrets.{key}.secret and secrets.{key}.key "
                     f"(kubectl -n {spec.k8s.namespace} create secret generic NAME --from-file=KEY=PATH)",
            )
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}})
    return env


def container_resources(spec: JobSpec, gpu: GpuType) -> dict[str, Any]:
    gpus = spec.distributed.gpus_per_node
    memory = k8s_quantity(spec.resources.mem_per_node)
    return {
        # No CPU limit: throttled data loaders starve GPUs; the request reserves the cores.
        "limits": {gpu.resource: gpus, "memory": memory},
        "requests": {gpu.resource: gpus, "cpu": str(spec.resources.cpus_per_gpu * gpus), "memory": memory},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> dict[str, Any]:
    """Pod Security Standard "restricted": non-root, RuntimeDefault seccomp (see manifests/namespace.yaml)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volume_mounts(spec: JobSpec) -> list[dict[str, Any]]:
    return [
        {"name": "shared", "mountPath": spec.k8s.mount_path},
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


def volumes(spec: JobSpec) -> list[dict[str, Any]]:
    return [
        {"name": "shared", "persistentVolumeClaim": {"claimName": spec.k8s.pvc}},
        {"name": "spec", "configMap": {"name": spec_configmap_name(spec.name), "defaultMode": 0o444}},
        # Memory-backed: counts against the container's memory limit, so mem_per_node should include it.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s_quantity(spec.resources.shm_size)}},
    ]


def node_selector(spec: JobSpec, gpu: GpuType) -> dict[str, str]:
    return {**gpu.node_selector, **spec.k8s.node_selector}


def tolerations(spec: JobSpec, gpu: GpuType) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for tol in [*gpu.tolerations, *spec.k8s.tolerations]:
        item = tol.model_dump(exclude_none=True)
        if item not in result:
            result.append(item)
    return result


def trainer_command(spec: JobSpec) -> list[str]:
    """jobs.launch; torchrun reads the operator's PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT."""
    return launch_command(spec, SPEC_PATH, [])


def check_spec(spec: JobSpec) -> None:
    """What Kubernetes needs beyond the spec's own validation, said as a fix."""
    if not spec.image:
        raise UsageError("Kubernetes runs a container image; the spec has no `image`",
                         hint="set image: REGISTRY/mbl-trainer:TAG (built from images/Dockerfile)")
    check_k8s(spec)  # every path the job reads or writes: absolute, on the PVC at k8s.mount_path


# ---- the objects -------------------------------------------------------------------------------


def configmap(spec: JobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, spec_configmap_name(spec.name)),
        "data": {SPEC_FILE: spec.to_yaml()},
    }


def container(spec: JobSpec, gpu: GpuType, name: str = CONTAINER) -> dict[str, Any]:
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(spec),
        # jobs.launch writes its outcome there; on a crash without one, the log's tail stands in
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": container_env(spec),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": container_resources(spec, gpu),
        "securityContext": container_security_context(),
        "volumeMounts": volume_mounts(spec),
    }


def pod_template(spec: JobSpec, gpu: GpuType) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "serviceAccountName": spec.k8s.service_account,
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.k8s.termination_grace_seconds,
        "securityContext": pod_security_context(),
        "containers": [container(spec, gpu)],
        "volumes": volumes(spec),
    }
    if spec.k8s.priority_class:
        pod["priorityClassName"] = spec.k8s.priority_class
    if spec.k8s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.k8s.image_pull_secrets]
    if node_selector(spec, gpu):
        pod["nodeSelector"] = node_selector(spec, gpu)
    if tolerations(spec, gpu):
        pod["tolerations"] = tolerations(spec, gpu)
    return {
        "metadata": {"labels": labels(spec), "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER}},
        "spec": pod,
    }


def _queue_labels(spec: JobSpec) -> dict[str, str]:
    return {QUEUE_LABEL: spec.k8s.queue} if spec.k8s.queue else {}


def pytorchjob(spec: JobSpec, gpu: GpuType) -> dict[str, Any]:
    template = pod_template(spec, gpu)
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if spec.distributed.nodes > 1:
        replicas["Worker"] = {
            "replicas": spec.distributed.nodes - 1, "restartPolicy": "ExitCode", "template": template,
        }
    run_policy: dict[str, Any] = {
        "backoffLimit": spec.k8s.max_restarts,
        "cleanPodPolicy": "Running",  # free the GPUs of pods still running; keep finished pods' logs
        "ttlSecondsAfterFinished": spec.k8s.ttl_seconds_after_finished,
        "activeDeadlineSeconds": spec.resources.time_limit_seconds,
    }
    if spec.k8s.queue:
        run_policy["suspend"] = True  # Kueue admits (unsuspends) it when the team's quota allows
    return {
        "apiVersion": f"{PYTORCHJOB['group']}/{PYTORCHJOB['version']}",
        "kind": PYTORCHJOB["kind"],
        "metadata": _metadata(spec, spec.name, _queue_labels(spec)),
        "spec": {
            "nprocPerNode": str(spec.distributed.gpus_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def trainjob_pod_patch(spec: JobSpec, gpu: GpuType) -> dict[str, Any]:
    """What the TrainJob patches into the pods of the runtime's replicated job `node`: the PyTorchJob pod
    template's settings that Kubeflow Trainer v2.3 lets a runtime patch carry (its schema allows
    serviceAccountName, securityContext, terminationGracePeriodSeconds, imagePullSecrets, volumes,
    nodeSelector, tolerations, and per container env, securityContext and volumeMounts)."""
    ctr = container(spec, gpu, TRAINJOB_CONTAINER)
    pod: dict[str, Any] = {
        "serviceAccountName": spec.k8s.service_account,
        "terminationGracePeriodSeconds": spec.k8s.termination_grace_seconds,
        "securityContext": pod_security_context(),
        "volumes": volumes(spec),
        "containers": [{
            "name": TRAINJOB_CONTAINER,
            "securityContext": ctr["securityContext"],
            "volumeMounts": ctr["volumeMounts"],
        }],
    }
    if spec.k8s.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.k8s.image_pull_secrets]
    if node_selector(spec, gpu):
        pod["nodeSelector"] = node_selector(spec, gpu)
    if tolerations(spec, gpu):
        pod["tolerations"] = tolerations(spec, gpu)
    return pod


def trainjob(spec: JobSpec, gpu: GpuType) -> dict[str, Any]:
    """The same job for Kubeflow Trainer v2.3 (trainer.kubeflow.org/v1alpha1, the CRD's storage version).

    `spec.trainer` carries image, command, env, nodes, processes per node and resources; one entry of
    `spec.runtimePatches` (manager `mbl/launcher`) puts the labels and annotations on the JobSet and the pods
    and sets the pods' service account, security contexts, grace period, pull secrets, volumes, mounts,
    node selector and tolerations. What a v2.3 TrainJob cannot say comes from the `mbl-torch` runtime
    (manifests/trainer/): the restart rule (a Job podFailurePolicy), backoffLimit, no service account token,
    no service links. `k8s.priority_class` has no place in a TrainJob (docs/kubernetes.md)."""
    ctr = container(spec, gpu, TRAINJOB_CONTAINER)
    patch = {
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {
            "metadata": {"labels": labels(spec), "annotations": annotations(spec)},
            "spec": {"replicatedJobs": [{
                "name": TRAINJOB_TARGET,
                "template": {"spec": {"template": {
                    "metadata": {
                        "labels": labels(spec),
                        "annotations": {"kubectl.kubernetes.io/default-container": TRAINJOB_CONTAINER},
                    },
                    "spec": trainjob_pod_patch(spec, gpu),
                }}},
            }]},
        }},
    }
    body: dict[str, Any] = {
        "runtimeRef": {"apiGroup": TRAINJOB["group"], "kind": "ClusterTrainingRuntime", "name": TRAINJOB_RUNTIME},
        "trainer": {
            "image": ctr["image"],
            "command": ctr["command"],
            "env": ctr["env"],
            "numNodes": spec.distributed.nodes,
            "numProcPerNode": spec.distributed.gpus_per_node,
            "resourcesPerNode": ctr["resources"],
        },
        "runtimePatches": [patch],
        "activeDeadlineSeconds": spec.resources.time_limit_seconds,
    }
    if spec.k8s.queue:
        body["suspend"] = True  # Kueue admits (unsuspends) it when the team's quota allows
    return {
        "apiVersion": f"{TRAINJOB['group']}/{TRAINJOB['version']}",
        "kind": TRAINJOB["kind"],
        "metadata": _metadata(spec, spec.name, _queue_labels(spec)),
        "spec": body,
    }


def render_objects(spec: JobSpec, profile: K8sProfile | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, job]: the order `kubectl apply -f` and `submit` create them in."""
    check_spec(spec)
    gpu = gpu_type(spec, profile or K8sProfile())
    job = trainjob(spec, gpu) if spec.k8s.api == "trainjob" else pytorchjob(spec, gpu)
    return [configmap(spec), job]


# ---- YAML -----------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the spec and the wrapper read as files); no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]], header: str | None = None) -> str:
    """Multi-document YAML for `kubectl apply -f -`."""
    docs = [yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120) for o in objects]
    text = "---\n" + "---\n".join(docs)
    return (f"# {header}\n" if header else "") + text
