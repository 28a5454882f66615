"""The sbatch script of a job: pure text from the spec and the cluster profile, never the live cluster.

Two layers: `sbatch_options()` decides the typed `#SBATCH` options (a dict in a fixed order), and
`render_script()` formats them and the script body, quoting every value with `shlex.quote`.

What the script does, attempt after attempt (Slurm requeues keep the job id):

0. runs in the directory `mbl submit` ran in (sbatch's default), like the local backend, so that
   relative data paths of the spec mean the same; with a container runtime that directory must be on
   the shared storage;
1. appends everything to `<run_dir>/logs/attempt-<SLURM_RESTART_COUNT>.log` (`--open-mode=append` keeps
   the `--output` file of earlier attempts; `%r` is no filename pattern, hence the `exec`);
2. runs the setup lines (profile, then spec), exports `env` and reads `secrets` from their files;
3. starts `python -m jobs.launch` (torchrun, see launcher/torchrun.py) once per node with `srun
   --kill-on-bad-exit=1` and a c10d rendezvous on the first node, at a port derived from the job id and
   the attempt;
4. traps USR1 (`--signal=B:USR1@N`, or `scancel --signal=USR1 --batch`) and TERM and sends SIGTERM to
   the job's steps with `scancel --signal=TERM JOBID` (not to srun, which would end the step and kill the
   ranks): jobs.launch forwards it to the ranks, which save and exit 75, and exits with the requeue code;
5. after the step, reads jobs.launch's outcome (one exit code per outcome, launcher/contract.py):
   done -> exit 0. requeue after a SIGTERM -> exit (Slurm is cancelling, requeueing or preempting this
   attempt and decides what follows; a requeue from here would undo an `scancel`). requeue otherwise (the
   time-limit warning, a crash after progress with restarts left: jobs.launch decides, counting
   slurm.max_restarts) -> `scontrol requeue`, and the trainer resumes from `latest`. failed -> exit 1 at
   once: a bad data path fails after one attempt, not after max_restarts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from launcher.contract import DONE_FILE, LAUNCH_REQUEUE, LOGS_DIR, SPEC_FILE
from launcher.errors import UsageError
from launcher.profile import SlurmProfile
from launcher.spec import JobSpec
from launcher.torchrun import launch_command

SCRIPT_FILE = "job.sbatch"

# Options `slurm.sbatch_args` may not replace: the script depends on them.
_FIXED = ("job-name", "nodes", "ntasks-per-node", "requeue", "signal", "open-mode", "output", "array", "dependency")


class Raw(str):
    """A shell expression the renderer must not quote (it expands at run time, e.g. "${MASTER_ADDR}")."""


# The scheduler's name of this job: a plain job's id, or an array task's `<array id>_<task id>` (inside a task,
# SLURM_JOB_ID is the task's own number, which `scontrol requeue` also takes; the pair is what squeue shows).
JOB_ME = "${SLURM_JOB_ID}"
TASK_ME = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"


@dataclass(frozen=True)
class Array:
    """A job array over the points of a pipeline's sweep (launcher/pipeline_slurm.py): task i runs point i as
    `names[i]` in `run_dirs[i]`, reading that run directory's spec. `tasks` is sbatch's `--array` value
    (`0-3%2`, or `1,3%2` when some points are finished); `log_dir` holds Slurm's own `--output` files."""

    name: str
    names: tuple[str, ...]
    run_dirs: tuple[str, ...]
    tasks: str
    log_dir: str


def q(value: object) -> str:
    return value if isinstance(value, Raw) else shlex.quote(str(value))


def runtime(spec: JobSpec, profile: SlurmProfile) -> str:
    return spec.slurm.container_runtime or profile.container_runtime


def account(spec: JobSpec, profile: SlurmProfile) -> str:
    """slurm.account, else the profile's account of the team, else the profile's default account, else the team."""
    return spec.slurm.account or profile.accounts.get(spec.team) or profile.default_account or spec.team


def partition(spec: JobSpec, profile: SlurmProfile) -> str | None:
    if spec.slurm.partition:
        known = [p.name for p in profile.partitions]
        if known and spec.slurm.partition not in known:
            raise UsageError(
                f"slurm.partition {spec.slurm.partition!r} is not a partition of the cluster profile",
                hint=f"use one of {', '.join(known)}, or add it to the profile",
            )
        return spec.slurm.partition
    return profile.partition_for(spec.resources.gpu_type)


def check(spec: JobSpec, profile: SlurmProfile) -> None:
    """Rules that need the profile: an absolute run directory; with a container runtime, an image and
    every path of the spec inside what the container mounts (launcher/paths.py)."""
    if not PurePosixPath(spec.run_dir).is_absolute():
        raise UsageError(
            f"checkpoint.dir resolves to {spec.run_dir!r}, not an absolute path",
            hint="render a resolved spec (the CLI resolves it against the current directory)",
        )
    rt = runtime(spec, profile)
    if rt != "none":
        if not spec.image:
            raise UsageError(
                f"the {rt} container runtime needs an image, and the spec has none",
                hint="set image: (build it from images/Dockerfile) or --set slurm.container_runtime=none",
            )
        from launcher.paths import check_slurm

        check_slurm(spec, profile.shared_root, rt)  # every path the job reads or writes, under the mounts


def sbatch_options(spec: JobSpec, profile: SlurmProfile, array: Array | None = None) -> dict[str, str | None]:
    """The #SBATCH options, in the order they are written; None means a flag without a value. With `array`,
    the array's name, `--array` and one `--output` per task (`%A_%a`) under its log folder."""
    check(spec, profile)
    d, r, s = spec.distributed, spec.resources, spec.slurm
    opts: dict[str, str | None] = {
        "job-name": array.name if array else spec.name,
        "nodes": str(d.nodes),
        "ntasks-per-node": "1",
    }
    if profile.use_gpus_per_node:
        opts["gpus-per-node"] = str(d.gpus_per_node)
    else:
        opts["gres"] = f"gpu:{d.gpus_per_node}"
    opts["cpus-per-task"] = str(r.cpus_per_gpu * d.gpus_per_node)
    opts["mem"] = r.mem_per_node
    opts["time"] = r.time_limit
    part = partition(spec, profile)
    if part:
        opts["partition"] = part
    opts["account"] = account(spec, profile)
    qos = s.qos or profile.default_qos
    if qos:
        opts["qos"] = qos
    if s.constraint:
        opts["constraint"] = s.constraint
    if s.exclusive:
        opts["exclusive"] = None
    opts["requeue"] = None
    opts["signal"] = f"B:USR1@{s.signal_seconds}"
    opts["open-mode"] = "append"
    opts["output"] = f"{array.log_dir}/slurm-%A_%a.out" if array else f"{spec.run_dir}/{LOGS_DIR}/slurm-%j.out"
    if array:
        opts["array"] = array.tasks
    for key, value in sorted(s.sbatch_args.items()):
        if key in _FIXED:
            raise UsageError(
                f"slurm.sbatch_args.{key} would replace an option the script relies on",
                hint=f"remove it; the script sets --{key} itself (use the spec's fields to change it)",
            )
        opts[key] = value or None  # an empty value is a flag: {hold: ""} -> --hold
    return opts


def _container_args(spec: JobSpec, profile: SlurmProfile) -> list[str]:
    rt = runtime(spec, profile)
    mounts = [f"{profile.shared_root}:{profile.shared_root}", *spec.slurm.container_mounts]
    if rt == "pyxis":
        return [
            f"--container-image={pyxis_image(spec.image or '')}",
            f"--container-mounts={','.join(mounts)}",
            "--no-container-mount-home",
            Raw('--container-workdir="${SLURM_SUBMIT_DIR}"'),
        ]
    if rt == "oci":
        return oci_args(spec.image or "", mounts)
    return []


def oci_args(bundle: str, mounts: list[str]) -> list[str]:
    """Slurm's own OCI containers (oci.conf + runc): `srun --container=BUNDLE`, the mounts for images/oci-run.

    The bundle (images/bundle.sh) is a folder on every node; oci.conf's RunTimeRun (images/oci-run) reads the
    mounts from MBL_CONTAINER_MOUNTS in the step's environment, `;`-separated (srun's --export splits on `,`).
    """
    if not bundle.startswith("/"):
        raise UsageError(
            f"the oci container runtime runs an OCI bundle folder on the nodes, and image is {bundle!r}",
            hint="make one from the image with images/bundle.sh IMAGE /shared/bundles/NAME and set image: to its path",
        )
    bad = [m for m in mounts if "," in m or ";" in m]
    if bad:
        raise UsageError(
            f"slurm.container_mounts entries may not contain ',' or ';' with the oci runtime: {', '.join(bad)}",
            hint="rename the folder, or mount a parent of it",
        )
    return [f"--container={bundle}", f"--export=ALL,MBL_CONTAINER_MOUNTS={';'.join(mounts)}"]


def _wrapper(spec: JobSpec, profile: SlurmProfile) -> list[str]:
    """What runs the in-job command inside the step: apptainer, or nothing (pyxis and oci take srun flags)."""
    if runtime(spec, profile) != "apptainer":
        return []
    mounts = [f"{profile.shared_root}:{profile.shared_root}", *spec.slurm.container_mounts]
    return ["apptainer", "exec", "--nv", "--bind", ",".join(mounts), "--pwd", Raw('"${SLURM_SUBMIT_DIR}"'),
            apptainer_image(spec.image or "")]


def pyxis_image(image: str) -> str:
    """enroot's image syntax: `ghcr.io/org/img:tag` -> `ghcr.io#org/img:tag`; a path (a .sqsh file) as is."""
    if image.startswith(("/", "./")) or "#" in image:
        return image
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return f"{first}#{rest}"
    return image


def apptainer_image(image: str) -> str:
    """A .sif path or a URI as is; a registry reference becomes `docker://...`."""
    if image.startswith("/") or image.endswith(".sif") or "://" in image:
        return image
    return f"docker://{image}"


def _secret_path(path: str) -> str:
    """A secret file path for the shell: `~/x` expands at run time on the cluster, the rest is quoted."""
    if path == "~" or path.startswith("~/"):
        rest = path[2:]
        return '"${HOME}"' + (f"/{shlex.quote(rest)}" if rest else "")
    return shlex.quote(path)


def _line(words: list[str], indent: str = "  ") -> str:
    """Words joined into one shell command, continued over lines of at most ~100 characters."""
    lines, cur = [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > 96:
            lines.append(cur + " \\")
            cur = indent + word
        else:
            cur = f"{cur} {word}" if cur else word
    lines.append(cur)
    return "\n".join(lines)


def render_script(spec: JobSpec, profile: SlurmProfile, trainer: list[str], array: Array | None = None) -> str:
    """The batch script. `trainer` is the torchrun command (Raw items are left unquoted). With `array`, the
    same script for every task of a job array: the task picks its run directory (and so its spec) and job
    name by SLURM_ARRAY_TASK_ID, and requeues itself alone."""
    opts = sbatch_options(spec, profile, array)
    d, s = spec.distributed, spec.slurm
    rt = runtime(spec, profile)
    me = TASK_ME if array else JOB_ME
    out: list[str] = [
        "#!/bin/bash",
        "# shellcheck disable=SC1090,SC1091  # setup lines may source files of the cluster",
        f"# mbl: {spec.kind} job {array.name if array else spec.name}: {d.nodes} node(s) x {d.gpus_per_node} GPU(s), "
        f"container runtime {rt}.",
        f"# Rendered by `mbl render --slurm`; submitted with `sbatch --parsable {SCRIPT_FILE}`.",
        "# Logs: logs/attempt-<SLURM_RESTART_COUNT>.log in the run directory.",
    ]
    for key, value in opts.items():
        out.append(f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={q(value)}")

    out += [
        "",
        "# Each attempt (the first run, then every requeue) appends to a log of its own. The job runs in the",
        "# directory `mbl submit` ran in (sbatch's default), where relative paths of the spec resolve.",
    ]
    if array:
        out += [
            "# A job array: task i runs sweep point i, in its own run directory (with its own spec.yaml), and",
            "# requeues itself alone.",
            _line(["run_dirs=(", *(q(x) for x in array.run_dirs), ")"]),
            _line(["job_names=(", *(q(x) for x in array.names), ")"]),
            'task="${SLURM_ARRAY_TASK_ID:?mbl: this script is a job array; submit it with --array}"',
            'run_dir="${run_dirs[task]}"',
        ]
    else:
        out += [f"run_dir={q(spec.run_dir)}"]
    out += [
        'attempt="${SLURM_RESTART_COUNT:-0}"',
        f'mkdir -p "${{run_dir}}/{LOGS_DIR}"',
        f'exec >>"${{run_dir}}/{LOGS_DIR}/attempt-${{attempt}}.log" 2>&1',
        f'echo "mbl: job {me} attempt ${{attempt}} on ${{SLURM_JOB_NODELIST}} in ${{PWD}} at $(date -u +%FT%TZ)"',
        "",
        "set -eo pipefail",
    ]
    setup = [*profile.setup, *s.setup]
    if setup and rt == "none":
        out += ["# Setup: the cluster profile's lines, then the spec's.", *setup]
    elif setup:
        out += ["# Setup on the host (the trainer itself runs in the container).", *setup]

    env = {"MBL_JOB_NAME": Raw('"${job_names[task]}"') if array else spec.name, "MBL_RUN_DIR": Raw('"${run_dir}"'),
           "MBL_BACKEND": "slurm", "MBL_JOB_ID": Raw(f'"{me}"'), "MBL_ATTEMPT": Raw('"${attempt}"'), "PYTHONUNBUFFERED": "1",
           **spec.env}
    out += ["", "# Environment (spec.env)."]
    out += [f"export {k}={q(v)}" for k, v in env.items()]
    if spec.secrets:
        out += ["", "# Secrets: read from files on the cluster at run time, never written into this script."]
        for name, ref in sorted(spec.secrets.items()):
            if not ref.file:
                raise UsageError(
                    f"secrets.{name} has no `file`, and Slurm jobs read secrets from files",
                    hint=f"set secrets.{name}.file to a file on the cluster (mode 600) holding the value",
                )
            out += [f'{name}="$(cat {_secret_path(ref.file)})"', f"export {name}"]
    out += [
        "set +e",
        "",
        "# Rendezvous: the first node hosts torchrun's c10d store, at a port that follows the job id and attempt.",
        'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"',
        "MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000 * 4 + attempt % 4))",
        "export MASTER_ADDR MASTER_PORT",
        "",
        "# Preemption: USR1 (the time limit, `scancel --signal=USR1 --batch`) and TERM (scancel, requeue) become",
        "# SIGTERM to the job's steps; jobs.launch forwards it to every rank, which saves a checkpoint and exits.",
        f"requeue_code={LAUNCH_REQUEUE}",
        'stop_signal=""',
        'srun_pid=""',
        "# shellcheck disable=SC2317  # called by the traps below",
        "forward_signal() {",
        '  stop_signal="$1"',
        '  echo "mbl: SIG$1 at $(date -u +%FT%TZ): asking the trainer to save a checkpoint and exit"',
        "  # To the tasks (torchrun) of every step, not to srun: srun ends the step on SIGTERM, killing the ranks.",
        '  if [[ -n "${srun_pid}" ]]; then',
        f'    scancel --signal=TERM "{me}" || echo "mbl: scancel --signal=TERM failed"',
        "  fi",
        "}",
        "trap 'forward_signal USR1' USR1",
        "trap 'forward_signal TERM' TERM",
        "",
        "# One task per node; each runs torchrun with gpus_per_node ranks. A failed node ends the step.",
        "rc=0",
        'if [[ -z "${stop_signal}" ]]; then',
    ]
    srun = [
        "srun", f"--nodes={d.nodes}", f"--ntasks={d.nodes}", "--ntasks-per-node=1",
        f"--cpus-per-task={opts['cpus-per-task']}", "--kill-on-bad-exit=1", "--label",
        *_container_args(spec, profile), *_wrapper(spec, profile),
    ]
    out += [_line(["  " + q(srun[0]), *(q(w) for w in srun[1:]), *(q(w) for w in trainer), "&"], "      ")]
    out += [
        "  srun_pid=$!",
        "  while true; do",
        '    wait "${srun_pid}"',
        "    rc=$?",
        '    kill -0 "${srun_pid}" 2>/dev/null || break  # a trapped signal interrupted the wait',
        "  done",
        '  srun_pid=""  # the step is over: a signal from here on has no step to forward to',
        "fi",
        'echo "mbl: the step ended with exit code ${rc}"',
        "",
        f'if [[ -f "${{run_dir}}/{DONE_FILE}" ]]; then',
        '  echo "mbl: DONE: the job is complete"',
        "  exit 0",
        "fi",
        'if [[ "${rc}" -eq "${requeue_code}" ]]; then',
        '  if [[ "${stop_signal}" == TERM ]]; then',
        '    echo "mbl: stopped by SIGTERM (scancel, scontrol requeue, preemption or the time limit); Slurm decides"',
        '    exit "${rc}"',
        "  fi",
        "  # Nodes the preflight found bad (jobs/preflight.py) are excluded from the next attempt, up to a limit.",
        f'  bad_nodes="${{run_dir}}/{LOGS_DIR}/bad-nodes-{me}"',
        '  exclude=""',
        '  if [[ -s "${bad_nodes}" ]]; then',
        '    exclude="$(sort -u "${bad_nodes}" | paste -sd, -)"',
        f'    if (( $(sort -u "${{bad_nodes}}" | wc -l) > {spec.slurm.max_node_exclusions} )); then',
        f'      echo "mbl: failed for good: the preflight found more bad nodes (${{exclude}}) than'
        f' slurm.max_node_exclusions ({spec.slurm.max_node_exclusions})"',
        "      exit 1",
        "    fi",
        "  fi",
        '  echo "mbl: requeueing (restart $((attempt + 1))); the trainer resumes from latest"',
        "  # `scontrol requeue` sends this script SIGTERM: ignored from here, so that the exclusion below is",
        "  # made before the script ends, whenever the signal comes.",
        "  trap '' TERM USR1",
        "  # slurmctld may be restarting (a failover, an upgrade): a few tries before giving up.",
        "  for try in 1 2 3 4 5 6; do",
        f'    if scontrol requeue "{me}"; then',
        '      if [[ -n "${exclude}" ]]; then',
        '        echo "mbl: the next attempt excludes ${exclude} (the preflight found them bad)"',
        f'        scontrol update JobId="{me}" ExcNodeList="${{exclude}}" ||'
        ' echo "mbl: excluding ${exclude} failed"',
        "      fi",
        "      exit 0",
        "    fi",
        '    echo "mbl: scontrol requeue failed (try ${try} of 6)"',
        "    sleep 10",
        "  done",
        '  echo "mbl: scontrol requeue failed"',
        "  exit 1",
        "fi",
        'if [[ "${rc}" -eq 0 ]]; then',
        f'  echo "mbl: warning: the step exited 0 without writing {DONE_FILE}"',
        "  exit 0",
        "fi",
        'echo "mbl: failed for good (exit code ${rc}); the reason is in the jobs.launch line above"',
        'exit "${rc}"',
    ]
    return "\n".join(out) + "\n"


def trainer_words(spec: JobSpec, array: Array | None = None) -> list[str]:
    """jobs.launch with a c10d rendezvous across the job's nodes (launcher.torchrun builds the rest); an array
    task reads the spec of its own run directory."""
    rendezvous = [
        f"--nnodes={spec.distributed.nodes}",
        "--rdzv-backend=c10d",
        Raw('--rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}"'),
        Raw('--rdzv-id="${SLURM_JOB_ID}-${attempt}"'),
    ]
    spec_path = Raw(f'"${{run_dir}}"/{SPEC_FILE}') if array else f"{spec.run_dir}/{SPEC_FILE}"
    return launch_command(spec, spec_path, rendezvous)


def script(spec: JobSpec, profile: SlurmProfile, array: Array | None = None) -> str:
    return render_script(spec, profile, trainer_words(spec, array), array)


__all__ = ["Array", "SCRIPT_FILE", "SPEC_FILE", "script", "sbatch_options", "pyxis_image", "apptainer_image", "account"]
