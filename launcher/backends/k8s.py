"""The Kubernetes backend: a PyTorchJob (or Trainer TrainJob) plus its spec ConfigMap, and the official client.

`dryrun` is pure (see `k8s_render`): `mbl render --k8s` prints the manifests as multi-document YAML that
`kubectl apply -f -` accepts. `submit` creates exactly those objects with the `kubernetes` client (imported
only here, inside the methods that talk to a cluster, so the CLI starts fast). `status` reads the job's
conditions and its pods, `logs` reads a pod's log (the master by default), `cancel` deletes the job with
foreground propagation. Cluster errors become `BackendError`s that say what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from launcher.backends import k8s_render as render
from launcher.backends.base import Backend, JobRef, JobState, JobStatus, Request
from launcher.errors import BackendError, UsageError
from launcher.profile import K8sProfile, Profile
from launcher.spec import JobSpec

MANIFESTS = "manifests.yaml"
TIMEOUT = (10, 60)  # (connect, read) seconds for every call but a followed log

TRAINING_OPERATOR_INSTALL = (
    'kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.0"'
)
TRAINER_INSTALL = (
    "install Kubeflow Trainer v2.3 (https://www.kubeflow.org/docs/components/trainer/) and apply manifests/trainer/"
)

# ---- job state, table-driven -------------------------------------------------------------------------

# Condition type (the newest one with status True wins; terminal types first) -> state.
# PyTorchJob (training-operator v1): Created, Running, Restarting, Succeeded, Failed, Suspended.
# TrainJob (Kubeflow Trainer): Created, Suspended, Complete, Failed.
CONDITION_STATES: dict[str, JobState] = {
    "Succeeded": JobState.COMPLETED,
    "Complete": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Restarting": JobState.REQUEUED,
    "Running": JobState.RUNNING,
    "Suspended": JobState.PENDING,
    "Created": JobState.PENDING,
}
CONDITION_PRIORITY = ("Succeeded", "Complete", "Failed", "Suspended", "Restarting", "Running", "Created")
# A Failed condition whose message matches -> a more precise state.
FAILED_MESSAGES: list[tuple[re.Pattern[str], JobState]] = [
    (re.compile(r"deadline|active longer than", re.I), JobState.TIMEOUT),
]
# Why a pod waits, in words: container waiting reasons and pod condition reasons.
POD_REASONS: dict[str, str] = {
    "Unschedulable": "unschedulable",
    "ErrImagePull": "cannot pull the image (check `image` and k8s.image_pull_secrets)",
    "ImagePullBackOff": "cannot pull the image (check `image` and k8s.image_pull_secrets)",
    "InvalidImageName": "the image name is invalid",
    "CreateContainerConfigError": "cannot create the container (often a missing Secret or key)",
    "ContainerCreating": "starting: pulling the image and mounting volumes",
    "PodInitializing": "starting",
    "CrashLoopBackOff": "the container keeps crashing",
}


def state_from_conditions(conditions: list[dict[str, Any]] | None) -> tuple[JobState, str, str]:
    """(state, condition type, message) from a job's status.conditions; UNKNOWN when none is known."""
    active = {c.get("type"): c for c in conditions or [] if str(c.get("status")) == "True"}
    for ctype in CONDITION_PRIORITY:
        if ctype in active:
            message = str(active[ctype].get("message") or "")
            state = CONDITION_STATES[ctype]
            if state is JobState.FAILED:
                for pattern, better in FAILED_MESSAGES:
                    if pattern.search(message) or pattern.search(str(active[ctype].get("reason") or "")):
                        state = better
            return state, ctype, message
    return JobState.UNKNOWN, "", ""


def pod_problem(pod: dict[str, Any]) -> str:
    """Why a pending pod is not running yet, in words ("" when nothing is known)."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and str(cond.get("status")) == "False":
            reason = cond.get("reason") or "Unschedulable"
            words = POD_REASONS.get(reason, reason)
            return f"{words}: {cond.get('message')}" if cond.get("message") else words
    for cs in status.get("containerStatuses") or status.get("initContainerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            words = POD_REASONS.get(waiting["reason"], waiting["reason"])
            return f"{words}: {waiting['message']}" if waiting.get("message") else words
    return ""


def termination_message(pod: dict[str, Any]) -> str:
    """The trainer container's last termination message: jobs.launch's outcome and reason; or that of a pipeline
    stage's init container that gave up waiting for its upstream stages (launcher/stagewait.py)."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        for key in ("state", "lastState"):
            terminated = (cs.get(key) or {}).get("terminated") or {}
            if terminated.get("message"):
                return str(terminated["message"]).strip().splitlines()[-1]
    return ""


def _body(exc: Any) -> dict[str, Any]:
    """The Status object of an ApiException ({} when it has none)."""
    try:
        body = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _namespace_missing(body: dict[str, Any]) -> bool:
    details = body.get("details") or {}
    return details.get("kind") == "namespaces" or bool(
        re.search(r'namespaces? "[^"]+" not found', str(body.get("message", ""))))


# ---- the backend ---------------------------------------------------------------------------------


class K8sBackend(Backend):
    name = "k8s"

    def __init__(
        self,
        profile: str | Path | Profile | K8sProfile | None = None,
        kube_context: str | None = None,
        server_dry_run: bool = False,
        force: bool = False,
        configuration: Any = None,
        api_client: Any = None,
    ):
        """`configuration` / `api_client`: a `kubernetes.client.Configuration` / `ApiClient` to use instead
        of the kubeconfig (tests point one at a local server)."""
        self._profile_arg = profile
        self.kube_context = kube_context
        self.server_dry_run = server_dry_run
        self.force = force
        self._configuration = configuration
        self._api_client = api_client
        self._clients: dict[str | None, Any] = {}  # one ApiClient per kubeconfig context

    # ---- pure ---------------------------------------------------------------------------------

    def _k8s_profile(self) -> K8sProfile:
        arg = self._profile_arg
        if isinstance(arg, K8sProfile):
            return arg
        if isinstance(arg, Profile):
            return arg.k8s
        from launcher.profile import load_profile

        return load_profile(arg).k8s

    def dryrun(self, spec: JobSpec) -> Request:
        objects = render.render_objects(spec, self._k8s_profile())
        kind = objects[-1]["kind"]
        header = (f"mbl {spec.kind} {spec.name}: ConfigMap + {kind}, {spec.distributed.nodes} node(s) x "
                  f"{spec.distributed.gpus_per_node} GPU(s), namespace {spec.k8s.namespace}")
        command = ["kubectl", "create", "-n", spec.k8s.namespace, "-f", MANIFESTS]
        return Request(self.name, spec, command, files={MANIFESTS: render.to_yaml(objects, header)})

    # ---- talking to the cluster -----------------------------------------------------------------

    def _client(self, context: str | None = None) -> Any:
        if self._api_client is not None:
            return self._api_client
        from kubernetes import client, config

        if self._configuration is not None:
            self._api_client = client.ApiClient(self._configuration)
            return self._api_client
        import os

        context = context or self.kube_context
        if context in self._clients:
            return self._clients[context]
        cfg = client.Configuration()
        try:
            # $KUBECONFIG read now, not when `kubernetes` was imported; a list of paths is merged.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context,
                                    client_configuration=cfg)
        except config.ConfigException as exc:
            if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=cfg)
            else:
                contexts = ""
                try:
                    contexts = ", ".join(c["name"] for c in config.list_kube_config_contexts(
                        config_file=os.environ.get("KUBECONFIG") or None)[0])
                except Exception:  # noqa: BLE001 - only for a better hint
                    pass
                raise BackendError(
                    f"cannot load the Kubernetes configuration: {exc}",
                    hint=(f"pass --context with one of: {contexts}" if contexts and context else
                          "point $KUBECONFIG (or ~/.kube/config) at the cluster, or run inside it"),
                ) from None
        self._clients[context] = client.ApiClient(cfg)
        return self._clients[context]

    def _host(self) -> str:
        try:
            return str(self._client().configuration.host)
        except Exception:  # noqa: BLE001
            return "the cluster"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call; turn transport failures into a BackendError (API errors pass through)."""
        import urllib3

        try:
            return fn(*args, **kwargs)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise BackendError(
                f"cannot reach the Kubernetes API at {self._host()} ({what}): {reason}",
                hint="check the cluster is up and the kubeconfig context (--context), VPN or proxy",
            ) from None

    @staticmethod
    def _api_error(exc: Any, verb: str, resource: str, namespace: str, name: str | None = None) -> BackendError:
        """An ApiException in words, with the fix."""
        status = getattr(exc, "status", 0)
        body = _body(exc)
        message = body.get("message") or getattr(exc, "reason", "") or str(exc)
        target = f"{resource} {name!r}" if name else resource
        if status == 403:
            return BackendError(
                f"forbidden: you may not {verb} {resource} in namespace {namespace!r}: {message}",
                hint=f"ask the cluster admin for RBAC that allows `{verb}` on {resource} in {namespace} "
                     "(manifests/rbac.yaml grants it to the mbl-launcher role)",
            )
        if status == 401:
            return BackendError(f"not authenticated to the cluster: {message}",
                                hint="refresh your credentials (kubeconfig) and try again")
        if status == 409:
            return BackendError(f"{target} already exists in namespace {namespace!r}",
                                hint=f"`mbl cancel {name}` first, or choose another job name")
        if status == 404:
            if _namespace_missing(body):
                return BackendError(
                    f"namespace {namespace!r} does not exist",
                    hint="apply the cluster base once (kubectl apply -k manifests/) or pass -n NAMESPACE",
                )
            return BackendError(f"{target} not found in namespace {namespace!r}: {message}")
        return BackendError(f"could not {verb} {target} in namespace {namespace!r}: HTTP {status} {message}")

    @staticmethod
    def _no_api(exc: Any, creating: bool = False) -> bool:
        """A 404 about the resource type itself (its CRD is not installed), not about one object.

        The API server answers "the server could not find the requested resource" then; a create can
        otherwise only 404 on a missing namespace."""
        if getattr(exc, "status", 0) != 404:
            return False
        body = _body(exc)
        message = str(body.get("message", ""))
        if "could not find the requested resource" in message:
            return True
        return creating and not _namespace_missing(body)

    # ---- submit -------------------------------------------------------------------------------

    def submit(self, request: Request) -> JobRef:
        import yaml
        from kubernetes import client

        spec = request.spec
        cm, job = list(yaml.safe_load_all(request.files[MANIFESTS]))
        api = render.APIS[spec.k8s.api]
        ns, name = spec.k8s.namespace, spec.name
        resource = f"{api['plural']}.{api['group']}"
        kwargs: dict[str, Any] = {"_request_timeout": TIMEOUT}
        if self.server_dry_run:
            kwargs["dry_run"] = "All"
        ac = self._client()
        custom, core = client.CustomObjectsApi(ac), client.CoreV1Api(ac)

        # The job first: a missing CRD, a forbidden create or a name clash leaves nothing behind.
        try:
            self._call("create the job", custom.create_namespaced_custom_object,
                       api["group"], api["version"], ns, api["plural"], job, **kwargs)
        except client.ApiException as exc:
            if exc.status == 409:
                raise self._exists_error(custom, api, spec) from None
            if self._no_api(exc, creating=True):
                raise BackendError(
                    f"the cluster does not serve {api['kind']} ({api['group']}/{api['version']}): "
                    f"its CustomResourceDefinition is not installed",
                    hint=(f"install the Kubeflow training operator v1.9: {TRAINING_OPERATOR_INSTALL}"
                          if spec.k8s.api == "pytorchjob" else TRAINER_INSTALL),
                ) from None
            raise self._api_error(exc, "create", resource, ns, name) from None
        try:
            self._call("create the spec ConfigMap", core.create_namespaced_config_map, ns, cm, **kwargs)
        except client.ApiException as exc:
            if exc.status == 409:  # left over by an earlier job of this name: ours now, overwrite it
                try:
                    self._call("update the spec ConfigMap", core.patch_namespaced_config_map,
                               cm["metadata"]["name"], ns, {"metadata": {k: cm["metadata"][k] for k in
                                                                         ("labels", "annotations")},
                                                            "data": cm["data"]}, **kwargs)
                    exc = None
                except client.ApiException as exc2:
                    exc = exc2
            if exc is not None:
                if not self.server_dry_run:
                    self._delete_quietly(custom, api, ns, name)
                raise self._api_error(exc, "create" if exc.status != 409 else "patch", "configmaps", ns,
                                      cm["metadata"]["name"]) from None
        extra = {
            "namespace": ns,
            "api": spec.k8s.api,
            "group": api["group"],
            "version": api["version"],
            "plural": api["plural"],
            "configmap": cm["metadata"]["name"],
            "fingerprint": spec.training_fingerprint(),
            "nodes": spec.distributed.nodes,
            "queue": spec.k8s.queue,
        }
        if self.kube_context:
            extra["context"] = self.kube_context
        return JobRef(self.name, f"{ns}/{name}", name, spec.run_dir, extra)

    def _exists_error(self, custom: Any, api: dict[str, str], spec: JobSpec) -> BackendError:
        """The job name is taken: say whether by this very spec or by a different one."""
        from kubernetes import client

        ns, name = spec.k8s.namespace, spec.name
        try:
            existing = self._call("read the existing job", custom.get_namespaced_custom_object,
                                  api["group"], api["version"], ns, api["plural"], name, _request_timeout=TIMEOUT)
        except client.ApiException:
            existing = {}
        theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(render.FINGERPRINT_ANNOTATION)
        ours = spec.training_fingerprint()
        if theirs and theirs != ours:
            return BackendError(
                f"a different job named {name!r} already exists in namespace {ns!r} "
                f"(training fingerprint {theirs}, this spec {ours}); it will not be replaced",
                hint=f"choose another name, or `mbl cancel {name}` if the old job should go",
            )
        state, _ctype, _msg = state_from_conditions((existing.get("status") or {}).get("conditions"))
        state_words = f" ({state.value.lower()})" if state is not JobState.UNKNOWN else ""
        return BackendError(
            f"job {name!r} already exists in namespace {ns!r}{state_words}"
            + ("" if theirs else " and was not made by mbl"),
            hint=(f"follow it: mbl logs -f {name}; to run it again: mbl cancel {name}, then submit"
                  if theirs else "choose another name"),
        )

    def _delete_quietly(self, custom: Any, api: dict[str, str], ns: str, name: str) -> None:
        try:
            custom.delete_namespaced_custom_object(api["group"], api["version"], ns, api["plural"], name,
                                                   propagation_policy="Foreground", _request_timeout=TIMEOUT)
        except Exception:  # noqa: BLE001 - best effort rollback; the original error is what matters
            pass

    # ---- following ----------------------------------------------------------------------------

    @staticmethod
    def _where(ref: JobRef) -> tuple[dict[str, str], str, str]:
        api_name = ref.extra.get("api", "pytorchjob")
        api = dict(render.APIS.get(api_name, render.PYTORCHJOB))
        for key in ("group", "version", "plural"):
            if ref.extra.get(key):
                api[key] = ref.extra[key]
        return api, str(ref.extra.get("namespace", "mbl")), ref.name

    def _get_job(self, ref: JobRef) -> dict[str, Any] | None:
        from kubernetes import client

        api, ns, name = self._where(ref)
        custom = client.CustomObjectsApi(self._client(ref.extra.get("context")))
        try:
            return self._call("read the job", custom.get_namespaced_custom_object, api["group"], api["version"],
                              ns, api["plural"], name, _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            if self._no_api(exc):
                raise BackendError(
                    f"the cluster does not serve {api['plural']}.{api['group']} (its CRD is not installed)",
                    hint=TRAINING_OPERATOR_INSTALL if api["group"] == "kubeflow.org" else TRAINER_INSTALL,
                ) from None
            if exc.status == 404:
                return None
            raise self._api_error(exc, "get", f"{api['plural']}.{api['group']}", ns, name) from None

    def _pods(self, ref: JobRef) -> list[dict[str, Any]]:
        from kubernetes import client

        api, ns, name = self._where(ref)
        core = client.CoreV1Api(self._client(ref.extra.get("context")))
        selector = (f"training.kubeflow.org/job-name={name}" if api["group"] == render.PYTORCHJOB["group"]
                    else f"jobset.sigs.k8s.io/jobset-name={name}")
        try:
            resp = self._call("list the job's pods", core.list_namespaced_pod, ns, label_selector=selector,
                              _preload_content=False, _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            raise self._api_error(exc, "list", "pods", ns) from None
        items = json.loads(resp.data or b"{}").get("items") or []
        # The server filters by label; a test server may not, so filter again.
        key, _, value = selector.partition("=")
        return [p for p in items if ((p.get("metadata") or {}).get("labels") or {}).get(key) == value]

    def status(self, ref: JobRef) -> JobStatus:
        job = self._get_job(ref)
        if job is None:
            if ref.extra.get("cancelled"):
                return JobStatus(JobState.CANCELLED)
            return JobStatus(JobState.UNKNOWN, reason="the job is gone (deleted, or cleaned up after it finished)")
        if (job.get("metadata") or {}).get("deletionTimestamp"):
            return JobStatus(JobState.CANCELLED, reason="being deleted")
        status = job.get("status") or {}
        state, ctype, message = state_from_conditions(status.get("conditions"))
        if state is JobState.UNKNOWN and not status:
            state, ctype = JobState.PENDING, "Created"
        if state.finished:
            if state is JobState.FAILED:  # what jobs.launch said, from the pods' termination messages
                said = [m for pod in self._pods(ref) if (m := termination_message(pod))]
                if said:
                    return JobStatus(state, reason="; ".join(dict.fromkeys(said)), detail=message)
            return JobStatus(state, reason=message)
        if ctype == "Suspended":
            queue = ref.extra.get("queue") or ((job.get("metadata") or {}).get("labels") or {}).get(render.QUEUE_LABEL)
            reason = (f"waiting for Kueue to admit it from queue {queue!r} (team GPU quota)" if queue
                      else "suspended")
            return JobStatus(JobState.PENDING, reason=reason, detail=message)
        pods = self._pods(ref)
        phases: dict[str, int] = {}
        problems = []
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase") or "Unknown"
            phases[phase] = phases.get(phase, 0) + 1
            problem = pod_problem(pod) if phase == "Pending" else ""
            if problem:
                problems.append(f"{(pod.get('metadata') or {}).get('name')}: {problem}")
        nodes = int(ref.extra.get("nodes") or 0)
        detail = ", ".join(f"{n} {p.lower()}" for p, n in sorted(phases.items()))
        if nodes:
            detail = f"{len(pods)}/{nodes} pods" + (f" ({detail})" if detail else "")
        if state in (JobState.PENDING, JobState.UNKNOWN) and not pods and ctype == "Created":
            return JobStatus(JobState.PENDING, reason="pods not created yet (check quota: kubectl describe "
                                                      f"{ref.extra.get('plural', 'pytorchjobs')} {ref.name})",
                             detail=detail)
        if problems and state in (JobState.PENDING, JobState.RUNNING, JobState.REQUEUED, JobState.UNKNOWN):
            waiting = JobState.PENDING if state is not JobState.REQUEUED else state
            return JobStatus(waiting, reason="; ".join(problems), detail=detail)
        return JobStatus(state, reason=message if state is JobState.REQUEUED else "", detail=detail)

    def ended_at(self, ref: JobRef) -> float | None:
        """When the job finished (unix time), from its terminal condition or completionTime; None while it
        runs or when the cluster no longer has it."""
        from datetime import datetime

        job = self._get_job(ref)
        status = (job or {}).get("status") or {}
        stamps = [c.get("lastTransitionTime") for c in status.get("conditions") or []
                  if str(c.get("status")) == "True" and CONDITION_STATES.get(c.get("type", "")) in
                  (JobState.COMPLETED, JobState.FAILED)]
        stamps.append(status.get("completionTime"))
        for stamp in stamps:
            if stamp:
                return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        return None

    def _log_pod(self, ref: JobRef, rank: int | None) -> str:
        api, _ns, name = self._where(ref)
        node = rank or 0
        nodes = int(ref.extra.get("nodes") or 0)
        if node < 0 or (nodes and node >= nodes):
            raise UsageError(f"--rank {node} is not a node of {name} (nodes 0..{max(nodes - 1, 0)})",
                             hint="--rank picks a pod (node rank): 0 is the master")
        if api["group"] == render.PYTORCHJOB["group"]:
            return render.pod_name(name, node)
        for pod in self._pods(ref):
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if labels.get("batch.kubernetes.io/job-completion-index", "0") == str(node):
                return str(pod["metadata"]["name"])
        raise BackendError(f"no pod of node {node} of {name} yet", hint=f"mbl status {name}")

    def logs(self, ref: JobRef, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        from kubernetes import client

        api, ns, name = self._where(ref)
        pod = self._log_pod(ref, rank)
        container = render.CONTAINER if api["group"] == render.PYTORCHJOB["group"] else render.TRAINJOB_CONTAINER
        core = client.CoreV1Api(self._client(ref.extra.get("context")))
        try:
            resp = self._call("read the log", core.read_namespaced_pod_log, pod, ns, container=container,
                              follow=follow, _preload_content=False,
                              _request_timeout=None if follow else TIMEOUT)
        except client.ApiException as exc:
            if exc.status == 400:  # the container has not started yet
                raise BackendError(f"no log yet from {pod}: the container has not started",
                                   hint=f"see why: mbl status {name}") from None
            if exc.status == 404:
                raise BackendError(f"pod {pod} does not exist (not started yet, or cleaned up)",
                                   hint=f"mbl status {name}") from None
            raise self._api_error(exc, "get", "pods/log", ns, pod) from None
        pending = b""
        try:
            for chunk in resp.stream(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace") + "\n"
            if pending:
                yield pending.decode(errors="replace")
        finally:
            resp.release_conn()

    def cancel(self, ref: JobRef) -> bool:
        """Delete the job (foreground: its pods go first; each gets its grace period to save) and its
        ConfigMap. False when the job is gone or had already finished."""
        from kubernetes import client

        job = self._get_job(ref)
        if job is None:
            return False
        state, _ctype, _msg = state_from_conditions((job.get("status") or {}).get("conditions"))
        if state.finished:
            return False
        api, ns, name = self._where(ref)
        ac = self._client(ref.extra.get("context"))
        custom, core = client.CustomObjectsApi(ac), client.CoreV1Api(ac)
        try:
            self._call("delete the job", custom.delete_namespaced_custom_object, api["group"], api["version"], ns,
                       api["plural"], name, propagation_policy="Foreground", _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise self._api_error(exc, "delete", f"{api['plural']}.{api['group']}", ns, name) from None
        try:
            core.delete_namespaced_config_map(ref.extra.get("configmap") or render.spec_configmap_name(name), ns,
                                              _request_timeout=TIMEOUT)
        except Exception:  # noqa: BLE001 - the job is what matters; a stray ConfigMap is replaced next time
            pass
        ref.extra["cancelled"] = True
        return True
