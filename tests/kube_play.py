"""Run the pods of `mbl render --k8s` for real, without an API server: expand the job the way its operator
does, then `podman kube play` each pod.

What the operators do, and this harness does the same (checked against their sources):

- PyTorchJob (training-operator v1.9, pkg/controller.v1/pytorch/envvar.go, master.go, common/pod.go): one pod
  per replica, `<job>-master-0` and `<job>-worker-<i>`, with the labels `training.kubeflow.org/job-name`,
  `-replica-type`, `-replica-index`, `-operator-name`, `-job-role: master` (Master only); the container env
  gets, after its own: PYTHONUNBUFFERED=1, MASTER_PORT and PET_MASTER_PORT (the Master template's
  `pytorchjob-port`), MASTER_ADDR and PET_MASTER_ADDR (`<job>-master-0`, a headless Service), WORLD_SIZE
  (replicas x nprocPerNode), RANK and PET_NODE_RANK (Master 0, Worker i+1), PET_NPROC_PER_NODE, PET_NNODES
  (replicas); `restartPolicy: ExitCode` becomes the pod's `Never`, and a pod that failed with an exit code
  >= 128 is deleted and created again (IsRetryableExitCode), one below is the job's failure.
- TrainJob (Kubeflow Trainer v2.3, pkg/runtime/framework/plugins/torch/torch.go, with the mbl-torch
  ClusterTrainingRuntime, through a JobSet and indexed Jobs): one pod per node, host name `<job>-node-0-<i>`
  in the JobSet's subdomain `<job>` (the pod's own name adds a random suffix, left out here), the runtime's
  container `node` overlaid with the TrainJob's trainer (image, command, env, resources) and its
  runtimePatches; env: JOB_COMPLETION_INDEX (the Job controller) and the torch plugin's PET_NNODES,
  PET_NPROC_PER_NODE, PET_NODE_RANK (the completion index), PET_MASTER_ADDR (`<job>-node-0-0.<job>`) and
  PET_MASTER_PORT (29500); a failed pod is replaced unless the runtime's podFailurePolicy says FailJob for
  its exit code (mbl-torch: any code but 0, 137 and 143).

What stands in for the cluster (podman has no Services, no operator, no PVC), said plainly:

- Services and DNS: the pods of a job share a podman network of their own (a bridge, one subnet per job),
  each at a fixed address, with its own hostname (the pod name) and `hostAliases` that map every pod's name
  (and the TrainJob's `<pod>.<job>`) to its address: what the headless Services' DNS gives in a cluster;
- ports: `containerPort`s are dropped, since kube play publishes each on the host's port of the same
  number (two jobs would collide); the pods reach each other on their network as in a cluster;
- the PVC: a named podman volume bound to a folder of the test (`claimName` renamed to a volume of its own,
  so that concurrent runs do not share one), which podman chowns to the pod's user;
- /dev/shm: kube play makes `emptyDir: {medium: Memory}` a root-owned disk volume that uid 1000 cannot
  write, so it is dropped and the pod keeps podman's own /dev/shm (a 64 MiB tmpfs, enough for the tiny job);
- the worker's init container (busybox `nslookup` of the master) is not added: no busybox image here, and
  the names resolve from the start;
- stopping a pod: `stop()` does what the kubelet does, SIGTERM to the pod's containers and SIGKILL after the
  grace period (podman ignores `terminationGracePeriodSeconds`); not `podman pod stop`, which also stops the
  infra container that holds the pod's network, so that the ranks could not finish their collective save;
- the operator's restart: `restart_retryable()` plays a failed pod again when the job's rule retries its
  exit code (a new container in a new pod of the same name, like the operator's delete and create).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from container_util import podman

OPERATOR = "pytorchjob-controller"
RETRYABLE = 128  # training-operator: IsRetryableExitCode(exitCode) is exitCode >= 128
TRAINJOB_PORT = 29500  # Kubeflow Trainer v2.3: constants.ContainerTrainerPort, the torch plugin's PET_MASTER_PORT


def _env(container: dict, name: str, value: str) -> None:
    container.setdefault("env", []).append({"name": name, "value": value})


def _trainer_container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] if c["name"] == name)


def expand_pytorchjob(job: dict) -> list[dict]:
    """The pods the training operator v1.9 creates for a PyTorchJob (without its Services)."""
    name, spec = job["metadata"]["name"], job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    master_port = next(p["containerPort"] for p in _trainer_container(replicas["Master"]["template"]["spec"],
                                                                        "pytorch").get("ports", [])
                       if p.get("name") == "pytorchjob-port")
    total = sum(r.get("replicas", 1) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    nproc_int = int(nproc) if nproc and str(nproc).isdigit() else 1
    master = f"{name}-master-0"
    pods = []
    for rtype in ("Master", "Worker"):
        if rtype not in replicas:
            continue
        rspec = replicas[rtype]
        for index in range(rspec.get("replicas", 1)):
            template = copy.deepcopy(rspec["template"])
            meta = template.get("metadata", {})
            labels = {**meta.get("labels", {}), "training.kubeflow.org/operator-name": OPERATOR,
                      "training.kubeflow.org/job-name": name,
                      "training.kubeflow.org/replica-type": rtype.lower(),
                      "training.kubeflow.org/replica-index": str(index)}
            if rtype == "Master":
                labels["training.kubeflow.org/job-role"] = "master"
            rank = index + 1 if rtype == "Worker" else index
            for c in template["spec"]["containers"]:
                _env(c, "PYTHONUNBUFFERED", "1")
                _env(c, "MASTER_PORT", str(master_port))
                _env(c, "PET_MASTER_PORT", str(master_port))
                _env(c, "MASTER_ADDR", master)
                _env(c, "PET_MASTER_ADDR", master)
                _env(c, "WORLD_SIZE", str(total * nproc_int))
                _env(c, "RANK", str(rank))
                _env(c, "PET_NODE_RANK", str(rank))
                if nproc is not None:
                    _env(c, "PET_NPROC_PER_NODE", str(nproc))
                _env(c, "PET_NNODES", str(total))
            policy = rspec.get("restartPolicy", "Never")
            template["spec"]["restartPolicy"] = "Never" if policy == "ExitCode" else policy
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{rtype.lower()}-{index}", "namespace": job["metadata"].get("namespace"),
                             "labels": labels, "annotations": meta.get("annotations", {})},
                "spec": template["spec"],
            })
    return pods


def _merge_container(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == "env":
            names = {e["name"] for e in value}
            out["env"] = [e for e in out.get("env", []) if e["name"] not in names] + copy.deepcopy(value)
        elif key in ("volumeMounts", "ports"):
            out[key] = out.get(key, []) + copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_trainjob(job: dict, runtime: dict, port: int = TRAINJOB_PORT) -> list[dict]:
    """The pods Kubeflow Trainer v2.3 (+ JobSet) creates for a TrainJob on the mbl-torch runtime."""
    name, spec = job["metadata"]["name"], job["spec"]
    trainer = spec.get("trainer", {})
    rjob = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
    pod_spec = copy.deepcopy(rjob["template"]["spec"]["template"]["spec"])
    pod_meta = copy.deepcopy(rjob["template"]["spec"]["template"].get("metadata", {}))
    ml = runtime["spec"].get("mlPolicy", {})
    nodes = int(trainer.get("numNodes") or ml.get("numNodes") or 1)
    nproc = trainer.get("numProcPerNode") or ml.get("torch", {}).get("numProcPerNode") or 1
    # The trainer's fields overlay the runtime's `node` container.
    overlay = {k: trainer[k] for k in ("image", "command", "args", "env") if k in trainer}
    if "resourcesPerNode" in trainer:
        overlay["resources"] = trainer["resourcesPerNode"]
    pod_spec["containers"] = [_merge_container(c, overlay) if c["name"] == "node" else c
                              for c in pod_spec["containers"]]
    # runtimePatches: the pod-level fields (volumes, mounts, security, scheduling) for the `node` job.
    for patch in spec.get("runtimePatches", []):
        for rj in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if rj.get("name") != "node":
                continue
            tpl = rj.get("template", {}).get("spec", {}).get("template", {})
            pod_meta.setdefault("labels", {}).update(tpl.get("metadata", {}).get("labels", {}))
            pod_meta.setdefault("annotations", {}).update(tpl.get("metadata", {}).get("annotations", {}))
            pspec = tpl.get("spec", {})
            for key, value in pspec.items():
                if key == "containers":
                    for c in value:
                        pod_spec["containers"] = [_merge_container(x, c) if x["name"] == c["name"] else x
                                                  for x in pod_spec["containers"]]
                elif key == "volumes":
                    pod_spec["volumes"] = pod_spec.get("volumes", []) + copy.deepcopy(value)
                else:
                    pod_spec[key] = copy.deepcopy(value)
    master = f"{name}-node-0-0.{name}"
    pods = []
    for index in range(nodes):
        ps = copy.deepcopy(pod_spec)
        for c in ps["containers"]:
            if c["name"] != "node":
                continue
            _env(c, "JOB_COMPLETION_INDEX", str(index))
            _env(c, "PET_NNODES", str(nodes))
            _env(c, "PET_NPROC_PER_NODE", str(nproc))
            _env(c, "PET_NODE_RANK", str(index))  # a fieldRef to the completion index annotation
            _env(c, "PET_MASTER_ADDR", master)
            _env(c, "PET_MASTER_PORT", str(port))
        ps["restartPolicy"] = ps.get("restartPolicy") or "Never"
        labels = {**pod_meta.get("labels", {}), "jobset.sigs.k8s.io/jobset-name": name,
                  "jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
                  "batch.kubernetes.io/job-completion-index": str(index)}
        annotations = {**pod_meta.get("annotations", {}), "batch.kubernetes.io/job-completion-index": str(index)}
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"{name}-node-0-{index}", "namespace": job["metadata"].get("namespace"),
                                  "labels": labels, "annotations": annotations},
                     "spec": ps})
    return pods


def for_podman(pods: list[dict], volumes: dict[str, str], subnet: str,
               extra_names: dict[str, str] | None = None) -> tuple[list[dict], dict[str, str]]:
    """The stand-ins for Services, PVCs and the memory emptyDir (see the module's docstring); returns the pods
    and the address each gets on the job's podman network (`subnet` is its first three octets)."""
    addresses = {p["metadata"]["name"]: f"{subnet}.{10 + i}" for i, p in enumerate(pods)}
    aliases: dict[str, list[str]] = {ip: [name] for name, ip in addresses.items()}
    for alias, pod in (extra_names or {}).items():
        aliases[addresses[pod]].append(alias)
    out = []
    for pod in copy.deepcopy(pods):
        spec = pod["spec"]
        spec["hostname"] = pod["metadata"]["name"]
        spec["hostAliases"] = [{"ip": ip, "hostnames": names} for ip, names in aliases.items()]
        memory = {v["name"] for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in memory]
        for v in spec["volumes"]:
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                v["persistentVolumeClaim"]["claimName"] = volumes[claim]
        for c in spec["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in memory]
            c.pop("ports", None)  # kube play would publish them on the host; pods reach each other directly
        pod["metadata"].pop("namespace", None)
        out.append(pod)
    return out, addresses


def pytorchjob_retries(code: int) -> bool:
    """restartPolicy: ExitCode (training-operator v1.9, IsRetryableExitCode)."""
    return code >= RETRYABLE


def trainjob_retries(runtime: dict):
    """The runtime's Job podFailurePolicy, for exit codes: FailJob -> no new pod; Ignore/Count or no rule ->
    the Job controller creates the pod again (within backoffLimit)."""
    rjob = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
    rules = rjob["template"]["spec"].get("podFailurePolicy", {}).get("rules", [])

    def retries(code: int) -> bool:
        for rule in rules:
            on = rule.get("onExitCodes")
            if not on:
                continue
            hit = (code in on["values"]) == (on["operator"] == "In")
            if hit:
                return rule["action"] != "FailJob"
        return True

    return retries


@dataclass
class Pods:
    """The played pods of one job: one kube-play file each, so that each can be stopped and played again."""

    work: Path
    configmaps: list[dict]
    pods: list[dict]
    network: str
    addresses: dict[str, str]
    retries: Any = pytorchjob_retries
    files: dict[str, Path] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [p["metadata"]["name"] for p in self.pods]

    def container(self, pod: str) -> str:
        spec = next(p for p in self.pods if p["metadata"]["name"] == pod)["spec"]
        return f"{pod}-{spec['containers'][0]['name']}"

    def play(self, pod: str | None = None) -> None:
        for p in self.pods:
            name = p["metadata"]["name"]
            if pod not in (None, name):
                continue
            path = self.work / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all([*self.configmaps, p], sort_keys=False))
            self.files[name] = path
            podman("pod", "rm", "-f", "--ignore", "--time", "0", name, check=False)
            podman("kube", "play", "--network", self.network, "--ip", self.addresses[name], str(path), timeout=120)

    def state(self, pod: str) -> tuple[str, int]:
        out = podman("inspect", "--format", "{{json .State}}", self.container(pod), check=False)
        if out.returncode != 0:
            return "missing", -1
        st = json.loads(out.stdout)
        return st.get("Status", ""), int(st.get("ExitCode", -1))

    def logs(self, pod: str) -> str:
        out = podman("logs", self.container(pod), check=False)
        return out.stdout + out.stderr

    def wait_exited(self, timeout: float, pods: list[str] | None = None) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        pods = pods or self.names()
        while True:
            states = {p: self.state(p) for p in pods}
            if all(s in ("exited", "stopped", "missing") for s, _ in states.values()):
                return {p: code for p, (_, code) in states.items()}
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p}\n{self.logs(p)[-3000:]}" for p in pods)
                raise AssertionError(f"pods still running after {timeout:.0f}s: {states}\n{logs}")
            time.sleep(2)

    def stop(self, grace: int, pods: list[str] | None = None) -> None:
        """What the kubelet does to a deleted or preempted pod: SIGTERM to its containers, SIGKILL after the
        grace period. Not `podman pod stop`: that stops the pod's infra container too, whose network
        namespace the trainer still needs to save (the kubelet keeps the sandbox until the containers end)."""
        pods = pods or self.names()
        podman("kill", "--signal", "TERM", *(self.container(p) for p in pods))
        try:
            self.wait_exited(grace, pods)
        except AssertionError:
            podman("kill", "--signal", "KILL", *(self.container(p) for p in pods), check=False)
            raise

    def restart_retryable(self) -> list[str]:
        """What the operator does with failed pods: those its rule retries are created again."""
        again = []
        for pod in self.names():
            status, code = self.state(pod)
            if status in ("exited", "stopped") and code != 0 and self.retries(code):
                again.append(pod)
                self.play(pod)
        return again

    def down(self) -> None:
        for pod in self.names():
            podman("pod", "rm", "-f", "--ignore", "--time", "0", pod, check=False)
        for cm in self.configmaps:  # kube play keeps each ConfigMap as a volume of that name
            podman("volume", "rm", "-f", cm["metadata"]["name"], check=False)


def create_network(name: str) -> str:
    """A podman bridge network of its own for one job; returns its subnet's first three octets."""
    import random

    for _ in range(20):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
        if podman("network", "create", "--subnet", f"{subnet}.0/24", name, check=False).returncode == 0:
            return subnet
    raise AssertionError(f"could not create podman network {name}")


def remove_network(name: str) -> None:
    podman("network", "rm", "-f", name, check=False)
