"""The Kubernetes side of team GPU quotas: the objects that enforce a policy (`mbl quota render --k8s`) and
the live GPU use per team (`mbl quota show --cluster k8s`).

`k8s_objects(policy)`: per team a ResourceQuota on `requests.nvidia.com/gpu` in the team's namespace, a Kueue
ClusterQueue `team-<team>` (cohort `mbl`, nominal quota = the team's GPUs, no borrowing) and its
LocalQueues; one shared ResourceFlavor. Kueue objects are `kueue.x-k8s.io/v1beta2`, the version Kueue v0.19
stores (`v1beta1` is served only as deprecated; v1beta2 renamed the ClusterQueue's `cohort` to `cohortName`).

`k8s_usage(policy)` reads, for each team of the policy, its namespace (`team.namespace or team`, as
`k8s_objects` renders it) and Kueue's ClusterQueue `team-<team>`. Which source gives which
number of the returned `K8sUsage` (a `launcher.quota.Usage`; `sources` says the same per team, `notes` says
what was missing):

running
    GPUs held by pods that exist: `status.used["requests.nvidia.com/gpu"]` of the team's ResourceQuota
    (`gpu-quota-<team>`; in a namespace of this team alone, any ResourceQuota on that resource). The quota
    controller counts every non-terminated pod (Pending ones included), whoever made it.
    Without such a ResourceQuota (or before its status is filled in), or when several teams of the policy
    share the namespace (the quota then counts them all), it is the sum of the GPU requests of the team's
    pods instead: pods not Succeeded/Failed, a pod's GPUs being max(sum over containers, largest init
    container), requests or else limits of `nvidia.com/gpu`.
pending
    GPUs of the team's unfinished PyTorchJobs (kubeflow.org/v1) not yet held by pods: the whole job
    (replicas x GPUs of the replica's pod template, summed over Master/Worker) when it is suspended
    (`spec.runPolicy.suspend`, Kueue's "not admitted yet", or a Suspended condition), else the job's GPUs
    minus the GPUs of its pods that exist (label `training.kubeflow.org/job-name`). 0 when the PyTorchJob
    CRD is not installed.
limit
    `status.hard` (else `spec.hard`) `["requests.nvidia.com/gpu"]` of that ResourceQuota; without one, the
    `nominalQuota` of `nvidia.com/gpu` in the ClusterQueue `team-<team>` (summed over flavors); else None.
    When both exist and disagree, a note says so (the ResourceQuota number is kept: it is the hard cap).
jobs
    The number of the team's PyTorchJobs that have not finished (Succeeded/Failed) and are not being deleted.

A job or pod belongs to the team named by its `mbl/team` label (what `mbl submit` sets, and the label of the
quota objects: one key everywhere), else to the team whose namespace it is in, when only one team
of the policy uses that namespace. Only the policy teams' namespaces are read.

Missing things are not errors: a ResourceQuota, a ClusterQueue, or a whole API (the Kueue or PyTorchJob CRD
not installed: HTTP 404 on the list) leave their numbers to the other sources, or 0 / None, with a note.
Kueue's status also adds a note (workloads pending / admitted, GPUs admitted). Reading ClusterQueues is
cluster-scoped and often not granted to users: a 403 there is a note as well. A 403 on the team's
namespace (resourcequotas, pods, pytorchjobs), a 401, or an unreachable API server raise `BackendError`
(translated by `launcher.backends.k8s`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from launcher.backends import k8s_render as render
from launcher.backends.k8s import TIMEOUT, K8sBackend, state_from_conditions
from launcher.quota import QuotaPolicy, Usage

GPU = "nvidia.com/gpu"
QUOTA_KEY = f"requests.{GPU}"
TEAM_LABEL = render.TEAM_LABEL
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"  # Kueue v0.19's storage version
KUEUE_API_VERSION = f"{KUEUE_GROUP}/{KUEUE_VERSION}"
KUEUE = (KUEUE_GROUP, KUEUE_VERSION, "clusterqueues")
COHORT = "mbl"  # the teams' ClusterQueues share one cohort; borrowingLimit 0 keeps each to its own share
FLAVOR = "default-gpu"
PYTORCHJOBS = (render.PYTORCHJOB["group"], render.PYTORCHJOB["version"], render.PYTORCHJOB["plural"])
DONE_PHASES = ("Succeeded", "Failed")


@dataclass
class K8sUsage(Usage):
    """A Usage with where each number came from, and what was missing."""

    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---- pure helpers ----------------------------------------------------------------------------------


def quantity(value: Any) -> int:
    """A GPU count from a Kubernetes quantity ("4", 4, "4.0"); 0 when it is not a number."""
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return 0


def _container_gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    # For an extended resource the request defaults to the limit, and may not differ from it.
    return quantity(requests.get(GPU, limits.get(GPU, 0)))


def pod_gpus(pod_spec: dict[str, Any] | None) -> int:
    """GPUs a pod (spec) requests, counted as the scheduler and the quota do."""
    pod_spec = pod_spec or {}
    main = sum(_container_gpus(c) for c in pod_spec.get("containers") or [])
    init = max((_container_gpus(c) for c in pod_spec.get("initContainers") or []), default=0)
    return max(main, init)


def job_gpus(job: dict[str, Any]) -> int:
    """GPUs a PyTorchJob asks for: replicas x GPUs of the pod template, over its replica types."""
    total = 0
    for replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        replicas = replica.get("replicas")
        total += (1 if replicas is None else int(replicas)) * pod_gpus((replica.get("template") or {}).get("spec"))
    return total


def job_suspended(job: dict[str, Any]) -> bool:
    if ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
        return True
    return any(c.get("type") == "Suspended" and str(c.get("status")) == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _team_of(obj: dict[str, Any], only_team: str | None) -> str | None:
    labels = _meta(obj).get("labels") or {}
    return str(labels[TEAM_LABEL]) if labels.get(TEAM_LABEL) else only_team


def cluster_queue_gpus(cq: dict[str, Any]) -> int | None:
    """nominalQuota of nvidia.com/gpu over the ClusterQueue's flavors; None when it covers no GPUs."""
    found, total = False, 0
    for group in (cq.get("spec") or {}).get("resourceGroups") or []:
        for flavor in group.get("flavors") or []:
            for res in flavor.get("resources") or []:
                if res.get("name") == GPU:
                    found, total = True, total + quantity(res.get("nominalQuota"))
    return total if found else None


def _flavor_gpus(entries: list[dict[str, Any]] | None) -> int:
    return sum(quantity(r.get("total")) for f in entries or [] for r in f.get("resources") or []
               if r.get("name") == GPU)


def _quota_hard(quota: dict[str, Any]) -> int | None:
    hard = (quota.get("status") or {}).get("hard") or (quota.get("spec") or {}).get("hard") or {}
    return quantity(hard[QUOTA_KEY]) if QUOTA_KEY in hard else None


def _pick_quota(quotas: list[dict[str, Any]], team: str, exclusive: bool) -> dict[str, Any] | None:
    for quota in quotas:
        if _meta(quota).get("name") == f"gpu-quota-{team}":
            return quota
    if not exclusive:
        return None
    gpu_quotas = [q for q in quotas if _quota_hard(q) is not None]
    return min(gpu_quotas, key=lambda q: _quota_hard(q) or 0) if gpu_quotas else None


# ---- enforcing a policy -----------------------------------------------------------------------------


def k8s_yaml(policy: QuotaPolicy) -> str:
    """`mbl quota render --k8s`: k8s_objects as multi-document YAML."""
    import yaml

    return "".join("---\n" + yaml.safe_dump(obj, sort_keys=False) for obj in k8s_objects(policy))


def k8s_objects(policy: QuotaPolicy) -> list[dict[str, Any]]:
    """Per team: a ResourceQuota on requests.nvidia.com/gpu in the team's namespace, a Kueue ClusterQueue with
    the team's nominal GPU quota and LocalQueues in the team's namespace; one shared ResourceFlavor."""
    labels = {"app.kubernetes.io/part-of": "mbl", "app.kubernetes.io/managed-by": "mbl"}
    objects: list[dict[str, Any]] = [{
        "apiVersion": KUEUE_API_VERSION, "kind": "ResourceFlavor",
        "metadata": {"name": FLAVOR, "labels": labels}, "spec": {},
    }]
    for name, team in sorted(policy.teams.items()):
        team_labels = {**labels, TEAM_LABEL: name}
        ns = team.namespace or name
        objects.append({
            "apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": f"gpu-quota-{name}", "namespace": ns, "labels": team_labels},
            "spec": {"hard": {QUOTA_KEY: str(team.gpus)}},
        })
        objects.append({
            "apiVersion": KUEUE_API_VERSION, "kind": "ClusterQueue",
            "metadata": {"name": f"team-{name}", "labels": team_labels},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "cohortName": COHORT,
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [{
                    "coveredResources": ["cpu", "memory", GPU],
                    "flavors": [{"name": FLAVOR, "resources": [
                        {"name": "cpu", "nominalQuota": 100000},
                        {"name": "memory", "nominalQuota": "100000Gi"},
                        {"name": GPU, "nominalQuota": team.gpus, "borrowingLimit": 0},
                    ]}],
                }],
            },
        })
        for queue in team.queues or [name]:
            objects.append({
                "apiVersion": KUEUE_API_VERSION, "kind": "LocalQueue",
                "metadata": {"name": queue, "namespace": ns, "labels": team_labels},
                "spec": {"clusterQueue": f"team-{name}"},
            })
    return objects


# ---- reading the cluster ---------------------------------------------------------------------------


class _Reader:
    """List calls through K8sBackend's client, transport and error translation. None: the API is not served."""

    def __init__(self, backend: K8sBackend, context: str | None):
        from kubernetes import client

        self._backend = backend
        self._client = client
        api_client = backend._client(context)
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def _list(self, what: str, verb_resource: str, namespace: str, fn: Any, *args: Any, **kwargs: Any,
              ) -> list[dict[str, Any]] | None:
        try:
            result = self._backend._call(what, fn, *args, _request_timeout=TIMEOUT, **kwargs)
        except self._client.ApiException as exc:
            if exc.status == 404:  # a list only 404s when the resource type is not served (no CRD)
                return None
            raise K8sBackend._api_error(exc, "list", verb_resource, namespace) from None
        if not isinstance(result, dict):  # _preload_content=False: the raw response
            result = json.loads(result.data or b"{}")
        return list(result.get("items") or [])

    def core_list(self, plural: str, namespace: str) -> list[dict[str, Any]] | None:
        fn = getattr(self.core, {"pods": "list_namespaced_pod",
                                 "resourcequotas": "list_namespaced_resource_quota"}[plural])
        return self._list(f"list {plural}", plural, namespace, fn, namespace, _preload_content=False)

    def jobs(self, namespace: str) -> list[dict[str, Any]] | None:
        group, version, plural = PYTORCHJOBS
        return self._list("list the PyTorchJobs", f"{plural}.{group}", namespace,
                          self.custom.list_namespaced_custom_object, group, version, namespace, plural)

    def cluster_queues(self) -> tuple[list[dict[str, Any]] | None, str]:
        """(ClusterQueues, "") or (None, why not). Cluster-scoped and often not granted: a 403 is a note."""
        group, version, plural = KUEUE
        try:
            result = self._backend._call("list the Kueue ClusterQueues", self.custom.list_cluster_custom_object,
                                         group, version, plural, _request_timeout=TIMEOUT)
        except self._client.ApiException as exc:
            if exc.status == 404:
                return None, f"the cluster does not serve {plural}.{group} (Kueue is not installed)"
            if exc.status == 403:
                return None, (f"not allowed to list {plural}.{group} (cluster-scoped): Kueue numbers left out; "
                              "ask the cluster admin for `list` on clusterqueues to see them")
            raise K8sBackend._api_error(exc, "list", f"{plural}.{group}", "(cluster-scoped)") from None
        return list(result.get("items") or []), ""


def k8s_usage(policy: QuotaPolicy, context: str | None = None, configuration: Any = None) -> dict[str, K8sUsage]:
    """Each policy team's GPU use on the cluster (see the module docstring for which source gives which number).

    `context`: the kubeconfig context (default: the current one). `configuration`: a
    `kubernetes.client.Configuration` to use instead of the kubeconfig (tests point one at a local server).
    Raises BackendError when the cluster cannot be reached or refuses to show a team's namespace."""
    reader = _Reader(K8sBackend(kube_context=context, configuration=configuration), context)
    by_ns: dict[str, list[str]] = {}
    for name, team in sorted(policy.teams.items()):
        by_ns.setdefault(team.namespace or name, []).append(name)
    usage: dict[str, K8sUsage] = {name: K8sUsage(name) for name in sorted(policy.teams)}

    def entry(team: str) -> K8sUsage:
        return usage.setdefault(team, K8sUsage(team))

    pod_gpus_by_team: dict[str, int] = {}
    quotas_by_ns: dict[str, list[dict[str, Any]] | None] = {}
    jobs_served = True
    for ns, teams in by_ns.items():
        only_team = teams[0] if len(teams) == 1 else None
        quotas_by_ns[ns] = reader.core_list("resourcequotas", ns)
        pods = [p for p in reader.core_list("pods", ns) or []
                if (p.get("status") or {}).get("phase") not in DONE_PHASES]
        held_by_job: dict[str, int] = {}
        for pod in pods:
            gpus = pod_gpus(pod.get("spec"))
            team = _team_of(pod, only_team)
            if team is not None:
                pod_gpus_by_team[team] = pod_gpus_by_team.get(team, 0) + gpus
            job_name = (_meta(pod).get("labels") or {}).get(JOB_NAME_LABEL)
            if job_name:
                held_by_job[job_name] = held_by_job.get(job_name, 0) + gpus
        jobs = reader.jobs(ns)
        if jobs is None:
            jobs_served = False
            continue
        for job in jobs:
            team = _team_of(job, only_team)
            if team is None or _meta(job).get("deletionTimestamp"):
                continue
            state, _ctype, _msg = state_from_conditions((job.get("status") or {}).get("conditions"))
            if state.finished:
                continue
            use = entry(team)
            use.jobs += 1
            wanted = job_gpus(job)
            use.pending += wanted if job_suspended(job) else max(0, wanted - held_by_job.get(_meta(job).get("name"), 0))

    cluster_queues, kueue_note = reader.cluster_queues()
    queues = {_meta(cq).get("name"): cq for cq in cluster_queues or []}

    for name, team in sorted(policy.teams.items()):
        use, ns = usage[name], team.namespace or name
        sharing = by_ns[ns]
        exclusive = len(sharing) == 1
        quotas = quotas_by_ns.get(ns)
        quota = _pick_quota(quotas or [], name, exclusive)
        quota_name = _meta(quota).get("name") if quota else None
        used = ((quota or {}).get("status") or {}).get("used") or {}
        if quota is not None and exclusive and QUOTA_KEY in used:
            use.running = quantity(used[QUOTA_KEY])
            use.sources["running"] = f"ResourceQuota {ns}/{quota_name} status.used[{QUOTA_KEY}]"
        else:
            use.running = pod_gpus_by_team.get(name, 0)
            use.sources["running"] = f"GPU requests of the team's pods in namespace {ns}"
            if quotas is None:
                use.notes.append("the cluster does not serve resourcequotas: running counted from the pods")
            elif quota is None:
                use.notes.append(f"no ResourceQuota on {QUOTA_KEY} for team {name} in namespace {ns}: "
                                 "running counted from the team's pods")
            elif not exclusive:
                use.notes.append(f"namespace {ns} is shared by teams {', '.join(sharing)}: its ResourceQuota counts "
                                 "them all, so running is counted from the team's pods")
            else:
                use.notes.append(f"ResourceQuota {ns}/{quota_name} has no status yet: running counted from the pods")
        use.sources["pending"] = f"unfinished PyTorchJobs in namespace {ns}, less the GPUs of their pods"
        use.sources["jobs"] = f"unfinished PyTorchJobs in namespace {ns}"
        if not jobs_served:
            use.notes.append(f"the cluster does not serve {PYTORCHJOBS[2]}.{PYTORCHJOBS[0]} "
                             "(training operator not installed): no pending GPUs or jobs counted")

        hard = _quota_hard(quota) if quota is not None else None
        cq = queues.get(f"team-{name}")
        nominal = cluster_queue_gpus(cq) if cq is not None else None
        if hard is not None:
            use.limit = hard
            use.sources["limit"] = f"ResourceQuota {ns}/{quota_name} hard[{QUOTA_KEY}]"
            if nominal is not None and nominal != hard:
                use.notes.append(f"ClusterQueue team-{name} has a nominal quota of {nominal} GPUs, "
                                 f"the ResourceQuota {hard}")
        elif nominal is not None:
            use.limit = nominal
            use.sources["limit"] = f"ClusterQueue team-{name} nominalQuota[{GPU}]"
        else:
            use.sources["limit"] = "none found (no ResourceQuota, no ClusterQueue)"

        if kueue_note:
            use.notes.append(kueue_note)
        elif cq is None:
            use.notes.append(f"no Kueue ClusterQueue team-{name}")
        else:
            status = cq.get("status") or {}
            use.notes.append(
                f"Kueue ClusterQueue team-{name}: {status.get('pendingWorkloads', 0)} workload(s) pending, "
                f"{status.get('admittedWorkloads', 0)} admitted holding "
                f"{_flavor_gpus(status.get('flavorsUsage'))} GPU(s)")
    return usage
