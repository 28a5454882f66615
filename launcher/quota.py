"""Team GPU quotas: one policy file -> a pre-check before submit, live use, cluster-native enforcement, reports.

The policy (YAML, validated like the job spec):

    teams:
      nlp:
        gpus: 4                 # GPUs the team may hold at once (running + pending)
        gpus_by_type: {h100: 4} # optional, per GPU type
        max_gpus_per_job: 4
        max_wall: 1-00:00:00
        partitions: [gpu]       # Slurm partitions (empty: any)
        queues: [nlp]           # Kueue LocalQueues (empty: any)
        priority: mbl-batch     # default PriorityClass / QoS

The cluster's own enforcement (Slurm GrpTRES, Kubernetes ResourceQuota / Kueue) stays the backstop for races:
`mbl quota apply` / `mbl quota render` produce it from the same file.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from launcher.errors import BackendError, UsageError
from launcher.spec import DNS_1035, NAME_MAX_LEN, JobSpec, Strict, dns_1123_label, parse_time_limit, queue_name

QUOTA_EXIT_CODE = 2


class TeamPolicy(Strict):
    gpus: int = Field(ge=0, description="GPUs the team may hold at once (running and pending jobs).")
    gpus_by_type: dict[str, int] = Field(default_factory=dict, description="Per GPU type limits.")
    max_gpus_per_job: int | None = Field(None, ge=1, description="The most GPUs one job may take.")
    max_wall: str | None = Field(None, description="The longest wall time of a job, in Slurm's format.")
    partitions: list[str] = Field(default_factory=list, description="Slurm partitions allowed (empty: any).")
    queues: list[str] = Field(default_factory=list, description="Kueue LocalQueues allowed (empty: any).")
    priority: str | None = Field(None, description="Default priority: Slurm QoS / Kubernetes PriorityClass.")
    namespace: str | None = Field(None, description="Kubernetes namespace of the team's jobs (default: the team).")

    @field_validator("max_wall")
    @classmethod
    def _wall(cls, value: str | None) -> str | None:
        if value is not None:
            parse_time_limit(value)
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        why = dns_1123_label(value) if value is not None else None
        if why:
            raise ValueError(f"a Kubernetes namespace {why}")
        return value

    @field_validator("queues")
    @classmethod
    def _queues(cls, value: list[str]) -> list[str]:
        for queue in value:
            why = queue_name(queue)
            if why:
                raise ValueError(f"queue {queue!r}: a Kueue LocalQueue's name {why}")
        return value


class QuotaPolicy(Strict):
    cluster_gpus: int | None = Field(None, ge=0, description="GPUs in the whole cluster (for Kueue's nominal quota).")
    teams: dict[str, TeamPolicy]

    @field_validator("teams")
    @classmethod
    def _names(cls, value: dict[str, TeamPolicy]) -> dict[str, TeamPolicy]:
        for name in value:
            if not DNS_1035.match(name):
                raise ValueError(f"team {name!r} must be a DNS-1035 label (it names accounts and queues)")
            if len(name) > NAME_MAX_LEN:
                raise ValueError(f"team {name!r} is {len(name)} characters; at most {NAME_MAX_LEN}, as a job's team")
        return value


def load_policy(path: str | Path) -> QuotaPolicy:
    from launcher.loading import load_document

    return load_document(path, QuotaPolicy, "quota policy")


# ---- live use ------------------------------------------------------------------------------------


@dataclass
class Usage:
    team: str
    running: int = 0
    pending: int = 0
    limit: int | None = None
    jobs: int = 0

    @property
    def in_use(self) -> int:
        return self.running + self.pending


_GPU_IN_TRES = re.compile(r"gres/gpu(?::[\w.-]+)?=(\d+)|gres:gpu(?::[\w.-]+)?:(\d+)|gpu(?::[\w.-]+)?:(\d+)")


def gpus_in_tres(text: str) -> int:
    """GPUs in a Slurm TRES string: 'cpu=2,gres/gpu=4', 'gres:gpu:4', 'gres/gpu:h100=8', 'gpu:2'."""
    best = 0
    for match in _GPU_IN_TRES.finditer(text or ""):
        value = int(next(g for g in match.groups() if g is not None))
        best = max(best, value)  # a typed and an untyped entry name the same GPUs
    return best


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise BackendError(f"{cmd[0]} not found", hint="run on a Slurm login node, or source the cluster's env") from None
    if proc.returncode:
        raise BackendError(f"{shlex.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def parse_squeue(text: str) -> dict[str, Usage]:
    """Lines of `squeue -h -o '%a|%T|%D|%b|%i'`: account, state, nodes, GPUs per node (tres-per-node)."""
    usage: dict[str, Usage] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        account, state, nodes, per_node, *_ = line.split("|") + ["", "", "", ""]
        gpus = gpus_in_tres(per_node) * (int(nodes) if nodes.isdigit() else 1)
        entry = usage.setdefault(account, Usage(account))
        entry.jobs += 1
        if state in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "STOPPED"):
            entry.running += gpus
        elif state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"):
            entry.pending += gpus
    return usage


def parse_sacctmgr_limits(text: str) -> dict[str, int | None]:
    """Lines of `sacctmgr -nP show assoc format=account,user,grptres`: the account-level GPU limit."""
    limits: dict[str, int | None] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        account, user, grptres = parts[0], parts[1], parts[2]
        if user:  # a user association; the account's own row (no user) carries GrpTRES
            limits.setdefault(account, None)
            continue
        limits[account] = gpus_in_tres(grptres) if "gpu" in grptres else None
    return limits


def slurm_usage(notes: list[str] | None = None) -> dict[str, Usage]:
    """GPUs of running and pending jobs per account (squeue) and each account's GrpTRES limit (sacctmgr).

    The limits live in Slurm's accounting: when slurmdbd (or its database) does not answer and `notes` is given,
    the use is still counted, the limits stay unknown (None) and `notes` gets a line saying the answer is
    incomplete; without `notes` that is an error."""
    usage = parse_squeue(_run(["squeue", "-h", "-a", "-o", "%a|%T|%D|%b|%i"]))
    try:
        limits = parse_sacctmgr_limits(_run(["sacctmgr", "-nP", "show", "assoc", "format=account,user,grptres"]))
    except BackendError as exc:
        if notes is None:
            raise
        notes.append(f"incomplete: the cluster's limits are unknown, Slurm's accounting did not answer "
                     f"({str(exc).splitlines()[-1]}); "
                     "the GPUs in use are counted from squeue")
        return usage
    for account, limit in limits.items():
        usage.setdefault(account, Usage(account)).limit = limit
    return usage


# ---- the pre-check ---------------------------------------------------------------------------------


def check_job(spec: JobSpec, policy: QuotaPolicy, usage: Usage | None, partition: str | None = None,
              count: int = 1) -> list[str]:
    """Why this job would break its team's share; empty when it fits. `count`: jobs of this spec that run at
    once (a pipeline's sweep counts as its max_parallel jobs)."""
    team = policy.teams.get(spec.team)
    if team is None:
        return [f"team {spec.team!r} has no quota in the policy (teams: {', '.join(sorted(policy.teams))})"]
    asked = spec.total_gpus
    problems = []
    if team.max_gpus_per_job is not None and asked > team.max_gpus_per_job:
        problems.append(f"team {spec.team}: the job asks {asked} GPUs, at most {team.max_gpus_per_job} per job")
    in_use = usage.in_use if usage else 0
    if in_use + asked * count > team.gpus:
        what = f"the job asks {asked} GPUs" if count == 1 else \
            f"the sweep asks {asked * count} GPUs ({count} jobs at once x {asked})"
        fewer = "ask for" if count == 1 else "lower max_parallel or ask for"
        problems.append(
            f"team {spec.team}: {what}, {in_use} are in use (running or pending), "
            f"{team.gpus} allowed; wait for a job to end or {fewer} {max(0, team.gpus - in_use)} GPUs"
        )
    gpu_type = spec.resources.gpu_type
    if gpu_type and gpu_type in team.gpus_by_type and asked > team.gpus_by_type[gpu_type]:
        problems.append(f"team {spec.team}: the job asks {asked} {gpu_type} GPUs, {team.gpus_by_type[gpu_type]} allowed")
    if team.max_wall and spec.resources.time_limit_seconds > parse_time_limit(team.max_wall):
        problems.append(f"team {spec.team}: time limit {spec.resources.time_limit} exceeds the longest allowed, "
                        f"{team.max_wall}")
    if partition and team.partitions and partition not in team.partitions:
        problems.append(f"team {spec.team}: partition {partition!r} not allowed ({', '.join(team.partitions)})")
    if spec.k8s.queue and team.queues and spec.k8s.queue not in team.queues:
        problems.append(f"team {spec.team}: queue {spec.k8s.queue!r} not allowed ({', '.join(team.queues)})")
    return problems


class QuotaExceeded(UsageError):
    exit_code = QUOTA_EXIT_CODE


def precheck(spec: JobSpec, policy_path: str, usage: Usage | None, partition: str | None = None,
             count: int = 1) -> None:
    """Refuse the job (QuotaExceeded) when it would break its team's share. `usage`: the team's current use on
    the cluster it goes to (the Slurm account the job is charged to, or the team on Kubernetes); `count`: jobs
    of this spec at once (a sweep's max_parallel)."""
    problems = check_job(spec, load_policy(policy_path), usage, partition, count)
    if problems:
        raise QuotaExceeded("; ".join(problems), hint="`mbl quota show` shows each team's use; --no-quota-check skips "
                            "this check (the cluster still enforces its own limits)")


def show_rows(policy: QuotaPolicy | None, usage: dict[str, Usage], team: str | None = None) -> list[dict[str, Any]]:
    names = sorted(set(policy.teams) if policy else set(usage))
    rows = []
    for name in names:
        if team and name != team:
            continue
        use = usage.get(name, Usage(name))
        allowed = policy.teams[name].gpus if policy and name in policy.teams else use.limit
        rows.append({
            "team": name, "running_gpus": use.running, "pending_gpus": use.pending, "in_use": use.in_use,
            "limit": allowed, "cluster_limit": use.limit, "jobs": use.jobs,
            "free": None if allowed is None else max(0, allowed - use.in_use),
        })
    return rows


# ---- enforcement on the cluster ------------------------------------------------------------------


def slurm_apply_commands(policy: QuotaPolicy, cluster_name: str | None = None) -> list[list[str]]:
    """The sacctmgr commands that make Slurm enforce the policy (accounts, GrpTRES, MaxTRESPerJob, MaxWall)."""
    commands = []
    for name, team in sorted(policy.teams.items()):
        add = ["sacctmgr", "-i", "add", "account", name, f"Description=mbl team {name}"]
        if cluster_name:
            add.append(f"Cluster={cluster_name}")
        commands.append(add)
        settings = [f"GrpTRES=gres/gpu={team.gpus}"]
        settings.append(f"MaxTRESPerJob=gres/gpu={team.max_gpus_per_job}" if team.max_gpus_per_job
                        else "MaxTRESPerJob=gres/gpu=-1")
        settings.append(f"MaxWall={team.max_wall}" if team.max_wall else "MaxWall=-1")
        commands.append(["sacctmgr", "-i", "modify", "account", "where", f"name={name}", "set", *settings])
    return commands


def slurm_apply(policy: QuotaPolicy, run: bool) -> list[str]:
    done = []
    for cmd in slurm_apply_commands(policy):
        line = shlex.join(cmd)
        if run:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            out = (proc.stdout + proc.stderr).strip()
            # `add account` of an existing account is not an error worth stopping for
            if proc.returncode and "Nothing new added" not in out and "already exists" not in out:
                raise BackendError(f"{line} failed: {out}")
        done.append(line)
    return done


# ---- reports -------------------------------------------------------------------------------------


def parse_sacct(text: str) -> list[dict[str, Any]]:
    """`sacct -a -X -n -P -o JobID,JobName,Account,User,AllocTRES,ElapsedRaw,State` -> rows with gpu_hours."""
    rows = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 7:
            continue
        job_id, name, account, user, tres, elapsed, state = parts[:7]
        gpus = gpus_in_tres(tres)
        seconds = int(elapsed) if elapsed.isdigit() else 0
        rows.append({"job": job_id, "name": name, "team": account, "user": user, "gpus": gpus,
                     "seconds": seconds, "state": state.split(" ")[0], "gpu_hours": gpus * seconds / 3600.0})
    return rows


def slurm_report_rows(since: str, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """GPU-hours per job from sacct. When Slurm's accounting does not answer and `notes` is given, the report
    falls back to the jobs of this registry (those mbl submitted here), each counted from its submission to its
    end or now (an upper bound: pending time counts), and `notes` says the report is incomplete."""
    try:
        return parse_sacct(_run(["sacct", "-a", "-X", "-n", "-P", "--starttime", since,
                                 "-o", "JobID,JobName,Account,User,AllocTRES,ElapsedRaw,State"]))
    except BackendError as exc:
        if notes is None:
            raise
        notes.append(f"incomplete: Slurm's accounting did not answer ({str(exc).splitlines()[-1]}); only the jobs "
                     "in this mbl registry "
                     "are counted, each from its submission to its end or now (pending time included), and "
                     "other users' jobs are missing")
        return registry_report_rows(since, backend="slurm")


def registry_report_rows(since: str, backend: str = "k8s", ended_at: Any = None) -> list[dict[str, Any]]:
    """GPU-hours of jobs from the registry (Kubernetes keeps no accounting): submit to end (or now).

    `ended_at(record)`: when a job the registry has no end for finished (asked from the cluster), or None;
    the answer is kept in the registry."""
    from launcher.registry import Registry

    start = datetime.fromisoformat(since).timestamp()
    now = datetime.now().timestamp()
    rows = []
    registry = Registry()
    for record in registry.list(backend=backend):
        if record.submitted_at < start:
            continue
        if not record.extra.get("ended_at") and ended_at is not None:
            end = ended_at(record)
            if end is not None:
                registry.save_extra(record, {**record.extra, "ended_at": end})
        ended = float(record.extra.get("ended_at") or now)
        seconds = max(0, int(ended - record.submitted_at))
        rows.append({"job": record.job_id, "name": record.name, "team": record.team,
                     "user": record.extra.get("user", os.environ.get("USER", "")), "gpus": record.gpus,
                     "seconds": seconds, "state": "", "gpu_hours": record.gpus * seconds / 3600.0})
    return rows


def aggregate(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    key = {"team": "team", "user": "user", "job": "job"}[by]
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = totals.setdefault(row[key], {by: row[key], "jobs": 0, "gpu_hours": 0.0})
        entry["jobs"] += 1
        entry["gpu_hours"] += row["gpu_hours"]
    out = sorted(totals.values(), key=lambda r: -r["gpu_hours"])
    for entry in out:
        entry["gpu_hours"] = round(entry["gpu_hours"], 4)
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
