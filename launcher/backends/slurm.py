"""The Slurm backend: an sbatch script per job (see slurm_render.py), then sbatch / squeue / sacct / scancel.

`dryrun` is pure: the script comes from the spec and the cluster profile. `submit` writes the resolved
spec and the script into the run directory and runs `sbatch --parsable`. `status` / `statuses` ask squeue
(live jobs) and then sacct (finished ones), one call each for any number of jobs (`mbl list`), map Slurm's
state names through one table (`SLURM_STATES`) to `JobState`, and explain pending reasons
(`PENDING_REASONS`). With slurmctld down the states come from sacct, with slurmdbd down from squeue and the
run directory, and `warnings` says so. `logs` follows the newest attempt's log.

submitit is not used: the job runs torchrun per node (not a pickled Python callable), so its in-job
`JobEnvironment` has nothing to do, and one `squeue`/`sacct` call per `mbl status` or `mbl list` needs
no watcher.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

from launcher.backends.base import Backend, JobRef, JobState, JobStatus, Request
from launcher.backends.slurm_render import SCRIPT_FILE, script
from launcher.contract import DONE_FILE, LOGS_DIR, SPEC_FILE
from launcher.errors import BackendError, MblError, UsageError
from launcher.outcomes import last_outcome
from launcher.spec import JobSpec

# Slurm job states (squeue %T and sacct State, long names) -> JobState. Anything else is UNKNOWN.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "REQUEUED": JobState.REQUEUED,
    "REQUEUE_FED": JobState.REQUEUED,
    "REQUEUE_HOLD": JobState.REQUEUED,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SUSPENDED": JobState.PREEMPTED,
    "STOPPED": JobState.PREEMPTED,
    "PREEMPTED": JobState.PREEMPTED,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
}

# Why a job pends, in words; the Slurm reason is kept beside it.
PENDING_REASONS: dict[str, str] = {
    "AssocGrpGRES": "waiting for the team's GPU quota (the account's GrpTRES gres/gpu is in use)",
    "AssocGrpGRESMinutes": "the team's GPU-minutes budget is spent",
    "AssocGrpCpuLimit": "waiting for the team's CPU quota",
    "AssocGrpMemLimit": "waiting for the team's memory quota",
    "AssocGrpNodeLimit": "waiting for the team's node quota",
    "AssocMaxJobsLimit": "the team runs as many jobs as its limit allows",
    "AssocGrpJobsLimit": "the team runs as many jobs as its limit allows",
    "QOSGrpGRES": "waiting for the QoS's GPU quota",
    "QOSMaxGRESPerUser": "you use as many GPUs as the QoS allows per user",
    "QOSMaxJobsPerUserLimit": "you run as many jobs as the QoS allows per user",
    "QOSGrpCpuLimit": "waiting for the QoS's CPU quota",
    "Priority": "queued behind jobs of higher priority",
    "Resources": "waiting for nodes with free GPUs, CPUs and memory",
    "BeginTime": "not before its begin time (a requeued job waits about two minutes)",
    "Dependency": "waiting for a job it depends on",
    "DependencyNeverSatisfied": "a job it depends on failed; it will never start",
    "JobHeldUser": "held by its user (scontrol release JOBID)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it needs are unavailable (down, drained or reserved)",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionTimeLimit": "its time limit exceeds the partition's",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "InvalidAccount": "its account is not valid; check slurm.account or the team",
    "InvalidQOS": "its QoS is not valid for the account",
    "NodeDown": "a node it needs is down",
    "Reservation": "waiting for its reservation",
    "launch failed requeued held": "its launch failed; held (scontrol release JOBID)",
    "NonZeroExitCode": "requeued after an attempt failed",
    "None": "",
}

_JOB_ID = re.compile(r"^\d+(_\d+)?$")

# sbatch's refusals that a choice fixes: a text of its message -> which choice.
SBATCH_REFUSALS: dict[str, str] = {
    "Invalid account or account/partition combination": "account",
    "Invalid account": "account",
    "invalid partition specified": "partition",
    "Invalid partition name specified": "partition",
    "Requested node configuration is not available": "nodes",
    "Memory specification can not be satisfied": "nodes",
}


def refusal_kind(message: str) -> str | None:
    """The SBATCH_REFUSALS key found in sbatch's message, else None."""
    return next((key for key in SBATCH_REFUSALS if key.lower() in message.lower()), None)


def parse_accounts(text: str) -> list[str]:
    """`sacctmgr -n -P show associations where user=U format=account` -> the accounts, sorted, once each."""
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


def parse_sinfo(text: str) -> list[dict]:
    """`sinfo -h --format=%P|%c|%m|%G` -> [{partition, default, cpus, memory, gres}] (memory in MB as "4000M")."""
    rows = []
    for row in parse_rows(text, ["partition", "cpus", "memory", "gres"]):
        name = row["partition"]
        rows.append({"partition": name.rstrip("*"), "default": name.endswith("*"), "cpus": row["cpus"],
                     "memory": f"{row['memory']}M" if row["memory"].isdigit() else row["memory"],
                     "gres": row["gres"] if row["gres"] not in ("", "(null)") else "no GPUs"})
    return rows


def account_source(spec: JobSpec, profile) -> str:
    """Where the account of launcher.backends.slurm_render.account came from, in words."""
    if spec.slurm.account:
        return "slurm.account"
    if spec.team in profile.accounts:
        return f"the cluster profile's account of team {spec.team!r}"
    if profile.default_account:
        return "the cluster profile's default_account"
    return "the spec names no team" if spec.team == "default" else f"the account of team {spec.team!r}"


def parse_state(text: str) -> JobState:
    """`CANCELLED by 0`, `RUNNING`, `OUT_OF_MEMORY`... -> JobState; an unknown name is UNKNOWN."""
    word = (text or "").strip().split(" ")[0].rstrip("+").upper()
    return SLURM_STATES.get(word, JobState.UNKNOWN)


def explain_reason(reason: str) -> str:
    reason = (reason or "").strip()
    words = PENDING_REASONS.get(reason)
    if words is None:
        return f"Slurm reason: {reason}" if reason else ""
    return f"{words} ({reason})" if words else ""


def parse_rows(text: str, fields: list[str]) -> list[dict[str, str]]:
    """`--parsable2 --noheader` (or squeue with `|` separators) output as dicts; short lines are padded."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = line.split("|")
        rows.append({f: (values[i].strip() if i < len(values) else "") for i, f in enumerate(fields)})
    return rows


SQUEUE_FIELDS = ["JobID", "State", "Reason", "RestartCnt", "NodeList"]
SACCT_FIELDS = ["JobIDRaw", "JobName", "State", "ExitCode", "Reason", "Elapsed", "NodeList"]
# Asked too, last: an array task's `<array id>_<task id>` (squeue's JobID and sacct's JobIDRaw are its own number).
SQUEUE_ARRAY_FIELD, SACCT_ARRAY_FIELD = "JobArrayID", "JobID"


def dependency_words(after: list[dict], pending: bool) -> str:
    """Why a job whose `afterok` dependency failed never runs, naming the upstream stages (ref.extra["after"]:
    [{"stage", "job_id"}]) instead of Slurm's "DependencyNeverSatisfied"."""
    names = " and ".join(f"{a.get('stage', 'job')} (job {a.get('job_id')})" for a in after) or "a job it needs"
    verb = "will never start" if pending else "cancelled by Slurm"
    one = len(after) <= 1
    return (f"{verb}: its dependency {names} did not complete" if one else
            f"{verb}: one of its dependencies {names} did not complete")


def aggregate(statuses: list[JobStatus], task_ids: list[str]) -> JobStatus:
    """The state of a job array from its tasks': running while any runs, pending while any waits, then the
    worst end (failed, timeout, cancelled) or completed; the detail counts the tasks by state."""
    counts: dict[str, int] = {}
    for st in statuses:
        counts[st.state.value] = counts.get(st.state.value, 0) + 1
    detail = "tasks: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    for state in (JobState.RUNNING, JobState.REQUEUED, JobState.PENDING, JobState.PREEMPTED, JobState.FAILED,
                  JobState.TIMEOUT, JobState.CANCELLED, JobState.UNKNOWN):
        hits = [(t, st) for t, st in zip(task_ids, statuses) if st.state == state]
        if hits:
            task, first = hits[0]
            reason = first.reason if state not in (JobState.RUNNING,) else ""
            return JobStatus(state, f"task {task}: {reason}" if reason else "", detail)
    return JobStatus(JobState.COMPLETED if statuses else JobState.UNKNOWN, "", detail)


def status_from_squeue(row: dict[str, str]) -> JobStatus:
    state = parse_state(row.get("State", ""))
    reason, restarts = row.get("Reason", ""), row.get("RestartCnt", "0") or "0"
    detail = f"restart {restarts}" if restarts not in ("", "0") else ""
    if state == JobState.PENDING:
        if restarts not in ("", "0"):
            state = JobState.REQUEUED
        return JobStatus(state, explain_reason(reason), detail)
    if state == JobState.UNKNOWN:
        return JobStatus(state, f"Slurm state {row.get('State')}", detail)
    nodes = row.get("NodeList", "")
    where = f"on {nodes}" if nodes and state == JobState.RUNNING else ""
    return JobStatus(state, "", ", ".join(x for x in (where, detail) if x))


def status_from_sacct(row: dict[str, str]) -> JobStatus:
    raw = row.get("State", "")
    state = parse_state(raw)
    code = row.get("ExitCode", "")
    detail = []
    if code and code != "0:0":
        detail.append(f"exit code {code}")
    if row.get("Elapsed"):
        detail.append(f"elapsed {row['Elapsed']}")
    reason = ""
    if state == JobState.PENDING:
        reason = explain_reason(row.get("Reason", ""))
    elif state == JobState.UNKNOWN:
        reason = f"Slurm state {raw}"
    elif raw.startswith("CANCELLED by"):
        reason = raw.lower()
    return JobStatus(state, reason, ", ".join(detail))


def _first_error(proc: subprocess.CompletedProcess) -> str:
    """The last line of a failed Slurm command's message ("slurm_load_jobs error: Unable to contact ..."),
    without the command's own name in front ("sacct: error: ..." -> "error: ...")."""
    lines = [x.strip() for x in (proc.stderr or proc.stdout or "").splitlines() if x.strip()]
    if not lines:
        return f"exit {proc.returncode}"
    tool = Path(str(proc.args[0])).name if isinstance(proc.args, list) and proc.args else ""
    return lines[-1].removeprefix(f"{tool}: ") if tool else lines[-1]


def attempt_logs(run_dir: str) -> list[Path]:
    """The attempt logs of a run directory, oldest attempt first."""
    def number(p: Path) -> int:
        m = re.fullmatch(r"attempt-(\d+)\.log", p.name)
        return int(m.group(1)) if m else -1

    return sorted((Path(run_dir) / LOGS_DIR).glob("attempt-*.log"), key=number)


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, profile: str | None = None, force: bool = False, poll_seconds: float = 1.0):
        self.profile_path = profile
        self.force = force
        self.poll_seconds = poll_seconds
        self._profile = None
        self.warnings: list[str] = []  # what a query could not ask (a daemon down), for the CLI to print once

    @property
    def profile(self):
        if self._profile is None:
            from launcher.profile import load_profile

            self._profile = load_profile(self.profile_path)
        return self._profile

    # ---- pure ---------------------------------------------------------------------------------

    def dryrun(self, spec: JobSpec) -> Request:
        text = script(spec, self.profile.slurm)
        path = f"{spec.run_dir}/{SCRIPT_FILE}"
        files = {SPEC_FILE: spec.to_yaml(), SCRIPT_FILE: text}
        return Request(self.name, spec, ["sbatch", "--parsable", path], files=files)

    # ---- acting -------------------------------------------------------------------------------

    def _run(self, args: list[str], ref: JobRef | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        if shutil.which(args[0]) is None:
            raise BackendError(
                f"`{args[0]}` is not on PATH: this machine is not a Slurm login node",
                hint="run mbl where the Slurm client tools are installed, or use `mbl render --slurm -o DIR`",
            )
        env = dict(os.environ)
        if ref is not None and ref.extra.get("slurm_conf") and not env.get("SLURM_CONF"):
            env["SLURM_CONF"] = ref.extra["slurm_conf"]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackendError(f"`{' '.join(args)}` did not answer in {timeout:.0f}s; is slurmctld up?") from None
        if check and proc.returncode != 0:
            raise BackendError(
                f"`{' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def submit(self, request: Request) -> JobRef:
        from launcher.rundir import check_run_dir, write_spec

        spec = request.spec
        check_run_dir(spec, force=self.force)
        write_spec(spec)
        run_dir = Path(spec.run_dir)
        (run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)  # --output must exist before the job starts
        path = run_dir / SCRIPT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(request.files[SCRIPT_FILE])
        tmp.replace(path)
        job_id = self.sbatch(request.command, spec, path)
        # Keep the exact script of this submission beside its logs.
        (run_dir / LOGS_DIR / f"job-{job_id}.sbatch").write_text(request.files[SCRIPT_FILE])
        extra = {"script": str(path)}
        if os.environ.get("SLURM_CONF"):
            extra["slurm_conf"] = os.environ["SLURM_CONF"]
        return JobRef(self.name, job_id, spec.name, spec.run_dir, extra)

    def sbatch(self, command: list[str], spec: JobSpec, script_path: Path) -> str:
        """Run `sbatch --parsable ...`: the job id, or sbatch's refusal explained (`_refusal`)."""
        proc = self._run(command, check=False)
        if proc.returncode != 0:
            raise self._refusal(proc.stderr.strip() or proc.stdout.strip(), spec, script_path)
        job_id = proc.stdout.strip().splitlines()[-1].split(";")[0] if proc.stdout.strip() else ""
        if not _JOB_ID.match(job_id):
            raise BackendError(f"sbatch --parsable printed no job id: {proc.stdout!r}")
        return job_id

    def _refusal(self, message: str, spec: JobSpec, script_path: Path) -> MblError:
        """sbatch's refusal, with what to choose instead where Slurm can tell: the accounts this user may
        charge, the partitions, what the nodes have. Those are bad input (exit 2); anything else fails (1)."""
        from launcher.backends.slurm_render import account, partition, sbatch_options

        what = SBATCH_REFUSALS.get(refusal_kind(message))
        if what is None:
            return BackendError(f"sbatch refused the job: {message}",
                                hint=f"see the script with `mbl render --slurm`; it is at {script_path}")
        profile = self.profile.slurm
        try:
            if what == "account":
                user = getpass.getuser()
                proc = self._run(["sacctmgr", "--noheader", "--parsable2", "show", "associations",
                                  "where", f"user={user}", "format=account"], check=False)
                choices = ", ".join(parse_accounts(proc.stdout)) or "none"
                charged = account(spec, profile)
                return UsageError(
                    f"sbatch refused account {charged!r} ({account_source(spec, profile)}): {message}",
                    hint=f"accounts {user} may use: {choices}; set team: or slurm.account to one of them "
                         "(--set team=NAME), or map the team to one in the cluster profile (slurm.accounts)")
            proc = self._run(["sinfo", "--noheader", "--format=%P|%c|%m|%G"], check=False)
            nodes = parse_sinfo(proc.stdout)
            if what == "partition":
                names = ", ".join(f"{p}{' (default)' if d else ''}" for p, d in
                                  dict.fromkeys((n["partition"], n["default"]) for n in nodes)) or "none"
                return UsageError(
                    f"sbatch refused partition {partition(spec, profile)!r}: {message}",
                    hint=f"partitions: {names}; set slurm.partition to one of them, or list them in the "
                         "cluster profile (slurm.partitions)")
            opts = sbatch_options(spec, profile)
            have = "; ".join(f"partition {n['partition']}: {n['cpus']} CPUs, {n['memory']} memory, {n['gres']}"
                             for n in nodes) or "sinfo lists no nodes"
            gpus = opts.get("gpus-per-node") or opts.get("gres", "")
            return UsageError(
                f"no node can hold one node of this job ({opts['cpus-per-task']} CPUs, {opts['mem']} memory, "
                f"GPUs {gpus}): {message}",
                hint=f"the nodes have: {have}; lower resources.cpus_per_gpu, resources.mem_per_node or "
                     "distributed.gpus_per_node")
        except MblError as exc:  # sacctmgr or sinfo did not answer: the refusal alone
            return BackendError(f"sbatch refused the job: {message}", hint=f"({exc}) see the script at {script_path}")

    # ---- following ----------------------------------------------------------------------------

    def _squeue_rows(self, refs: list[JobRef]) -> tuple[dict[str, dict[str, str]], str | None]:
        """One `squeue --jobs ID,ID,...` for all `refs`: (rows by job id, None), or ({}, why) when slurmctld did
        not answer. squeue leaves out the ids it has forgotten (a lone forgotten id is an error it gives)."""
        ids = list(dict.fromkeys(r.job_id for r in refs))
        fields = [*SQUEUE_FIELDS, SQUEUE_ARRAY_FIELD]
        fmt = ",".join(f"{f}:|" for f in fields)
        proc = self._run(["squeue", "--noheader", "--jobs", ",".join(ids), "-O", fmt], refs[0], check=False)
        if proc.returncode != 0:
            message = _first_error(proc)
            return {}, None if "invalid job id" in message.lower() else message
        rows = {}
        for row in parse_rows(proc.stdout, fields):
            rows.setdefault(row["JobID"], row)
            if "_" in row[SQUEUE_ARRAY_FIELD] and "[" not in row[SQUEUE_ARRAY_FIELD]:  # an array task, by its pair
                rows[row[SQUEUE_ARRAY_FIELD]] = row
        return rows, None

    def _sacct_rows(self, refs: list[JobRef]) -> tuple[dict[str, dict[str, str]], str | None]:
        """One `sacct --jobs ID,ID,...` for all `refs`: (the newest row of each job, None), or ({}, why) when
        Slurm's accounting (slurmdbd, or its database) did not answer."""
        # An array task is asked by its array's id: sacct knows no task that never started (its array was
        # cancelled while it pended) and then answers with the array's own row, `<id>_[0-3%2]`.
        ids = list(dict.fromkeys(r.job_id.split("_")[0] for r in refs))
        fields = [*SACCT_FIELDS, SACCT_ARRAY_FIELD]
        proc = self._run(["sacct", "--jobs", ",".join(ids), "--allocations", "--parsable2", "--noheader",
                          f"--format={','.join(fields)}"], refs[0], check=False)
        if proc.returncode != 0:
            return {}, _first_error(proc)
        rows: dict[str, dict[str, str]] = {}
        pending_arrays: dict[str, dict[str, str]] = {}
        for row in parse_rows(proc.stdout, fields):
            pair = row[SACCT_ARRAY_FIELD]
            if "_[" in pair:
                pending_arrays[pair.split("_")[0]] = row
            elif "_" in pair:
                rows[pair] = row
            rows.setdefault(row["JobIDRaw"], row)
        for ref in refs:
            base = ref.job_id.split("_")[0]
            if "_" in ref.job_id and ref.job_id not in rows and base in pending_arrays:
                rows[ref.job_id] = pending_arrays[base]
        return rows, None

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def statuses(self, refs: list[JobRef]) -> list[JobStatus]:
        """The states of many jobs with one squeue call, then one sacct call for the jobs squeue does not list
        (per Slurm configuration: jobs submitted with another SLURM_CONF are asked of their own cluster).

        When slurmctld does not answer, the states come from accounting (sacct); when slurmdbd does not, from
        squeue alone, and a job squeue has forgotten (MinJobAge after its end) is told by its run directory.
        Either way `warnings` says so, once."""
        arrays = [r for r in refs if r.extra.get("array_tasks")]
        if arrays:  # a job array's state is its tasks': asked with the rest, then summed up
            tasks = [JobRef(self.name, t, r.name, run_dir, {k: v for k, v in r.extra.items() if k != "array_tasks"})
                     for r in arrays for t, run_dir in r.extra["array_tasks"]]
            plain = [r for r in refs if not r.extra.get("array_tasks")]
            answers = dict(zip((id(r) for r in [*plain, *tasks]), self.statuses([*plain, *tasks])))
            out = []
            for ref in refs:
                if ref.extra.get("array_tasks"):
                    mine = [t for t in tasks if t.name == ref.name and t.job_id.split("_")[0] == ref.job_id]
                    out.append(aggregate([answers[id(t)] for t in mine], [t.job_id for t in mine]))
                else:
                    out.append(answers[id(ref)])
            return out
        found: dict[int, JobStatus] = {}
        groups: dict[str, list[JobRef]] = {}
        for ref in refs:  # the configuration _run uses: this environment's SLURM_CONF, else the submission's
            groups.setdefault(os.environ.get("SLURM_CONF") or ref.extra.get("slurm_conf", ""), []).append(ref)
        for group in groups.values():
            live, ctld_down = self._squeue_rows(group)
            need = [r for r in group if r.job_id not in live
                    or status_from_squeue(live[r.job_id]).state == JobState.UNKNOWN]
            acct, dbd_down = self._sacct_rows(need) if need else ({}, None)
            if ctld_down:
                self._warn(f"slurmctld did not answer (squeue: {ctld_down}); the states come from Slurm's "
                           "accounting (sacct), which can lag behind the controller by a few seconds")
            if dbd_down:
                self._warn(f"Slurm's accounting (slurmdbd) did not answer (sacct: {dbd_down}); the states come "
                           "from squeue alone, which forgets a job MinJobAge after it ends: such jobs are told "
                           "by their run directory (DONE, the last attempt's outcome) or shown UNKNOWN")
            for ref in group:
                found[id(ref)] = self._combine(ref, live.get(ref.job_id), acct.get(ref.job_id), ctld_down, dbd_down)
        return [found[id(ref)] for ref in refs]

    def _combine(self, ref: JobRef, row: dict[str, str] | None, acct: dict[str, str] | None,
                 ctld_down: str | None, dbd_down: str | None) -> JobStatus:
        status = self._combine_raw(ref, row, acct, ctld_down, dbd_down)
        # A pipeline's stage whose `afterok` dependency failed: Slurm cancels it (--kill-on-invalid-dep=yes) or
        # leaves it pending for ever; say which upstream stage it waited for, in words.
        source = row if row is not None else (acct or {})
        slurm_reason, raw_state = source.get("Reason", ""), source.get("State", "")
        if slurm_reason.startswith("Dependency") and "after" in ref.extra:
            if status.state == JobState.CANCELLED and not raw_state.startswith("CANCELLED by"):
                status.reason = dependency_words(ref.extra["after"], pending=False)
            elif status.state == JobState.PENDING and slurm_reason == "DependencyNeverSatisfied":
                status.reason = dependency_words(ref.extra["after"], pending=True)
        return status

    def _combine_raw(self, ref: JobRef, row: dict[str, str] | None, acct: dict[str, str] | None,
                     ctld_down: str | None, dbd_down: str | None) -> JobStatus:
        if row is not None:
            status = status_from_squeue(row)
            if status.state != JobState.UNKNOWN:
                return status
        if acct is not None:
            status = status_from_sacct(acct)
            if status.state in (JobState.FAILED, JobState.TIMEOUT) and not status.reason:
                status.reason = last_outcome(ref.run_dir)  # what jobs.launch said; the run dir is shared
            return status
        if row is not None:
            return status_from_squeue(row)
        if (Path(ref.run_dir) / DONE_FILE).exists():
            why = "Slurm's accounting did not answer" if dbd_down else "Slurm has forgotten the job"
            return JobStatus(JobState.COMPLETED, detail=f"{why}; DONE exists")
        if ctld_down and dbd_down:
            why = f"neither slurmctld (squeue) nor slurmdbd (sacct) answered about job {ref.job_id}"
        elif dbd_down:
            why = f"squeue no longer lists job {ref.job_id} and Slurm's accounting (sacct) did not answer"
        elif ctld_down:
            why = f"slurmctld did not answer and sacct does not know job {ref.job_id}"
        else:
            why = f"neither squeue nor sacct knows job {ref.job_id}"
        outcome = last_outcome(ref.run_dir) if (ctld_down or dbd_down) else ""
        return JobStatus(JobState.UNKNOWN, why + (f"; the run directory says {outcome}" if outcome else ""))

    def status(self, ref: JobRef) -> JobStatus:
        return self.statuses([ref])[0]

    def logs(self, ref: JobRef, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The newest attempt's log; with `follow`, keep reading and move on to each new attempt."""
        logs = attempt_logs(ref.run_dir)
        if not logs and not follow:
            raise BackendError(
                f"no attempt log yet in {ref.run_dir}/{LOGS_DIR}",
                hint=f"the job may still pend: mbl status {ref.name}",
            )
        current = logs[-1] if logs else None
        fh = open(current, errors="replace") if current else None
        last_check = 0.0
        try:
            while True:
                line = fh.readline() if fh else ""
                if line:
                    yield line
                    continue
                if not follow:
                    return
                newest = attempt_logs(ref.run_dir)
                if newest and newest[-1] != current:
                    rest = fh.read() if fh else ""
                    if rest:
                        yield rest
                    if fh:
                        fh.close()
                    current = newest[-1]
                    yield f"==> {current.name} <==\n"
                    fh = open(current, errors="replace")
                    continue
                now = time.monotonic()
                if now - last_check > 5 * self.poll_seconds:
                    last_check = now
                    if self.status(ref).state.finished:
                        rest = fh.read() if fh else ""
                        if rest:
                            yield rest
                        return
                time.sleep(self.poll_seconds / 4)
        finally:
            if fh:
                fh.close()

    def cancel(self, ref: JobRef) -> bool:
        """scancel: SIGTERM to the batch shell and every step; the ranks save, then the job ends CANCELLED."""
        if self.status(ref).state.finished:
            return False
        self._run(["scancel", ref.job_id], ref)
        ref.extra["cancelled"] = True
        return True
