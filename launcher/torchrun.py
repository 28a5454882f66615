"""The in-job command of every backend, built in one place: `python -m jobs.launch --spec SPEC -- <torchrun args>`.

`jobs.launch` runs torchrun on each node with these arguments and appends the trainer (`-m jobs.train --spec
SPEC`); what differs between backends is only how the nodes meet (the rendezvous arguments), which each
backend passes in:

- local: `--standalone --nnodes=1`;
- Slurm: `--nnodes=N --rdzv-backend=c10d --rdzv-endpoint=<first node>:<port> --rdzv-id=<job>-<attempt>`;
- Kubernetes: nothing, torchrun reads the training operator's `PET_NNODES`, `PET_NODE_RANK`,
  `PET_MASTER_ADDR` and `PET_MASTER_PORT` itself.

What is the same everywhere: one process per GPU, no torchrun-internal restarts (the cluster restarts the
job, from its newest checkpoint), SIGUSR1 handled like SIGTERM (Slurm's time-limit warning), and
`checkpoint.save_grace_seconds` between forwarding a stop signal to the ranks and killing them.
"""

from __future__ import annotations

from launcher.spec import JobSpec

# torchrun catches these, forwards the same signal to every rank (which saves and exits 75) and waits up to
# the shutdown timeout; torchrun's default list lacks SIGUSR1, which would kill it outright.
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun_args(spec: JobSpec, rendezvous: list[str]) -> list[str]:
    """torchrun's arguments (without the trainer): the rendezvous, then what every backend shares."""
    return [
        *rendezvous,
        f"--nproc-per-node={spec.distributed.gpus_per_node}",
        "--max-restarts=0",
        f"--shutdown-timeout={spec.checkpoint.save_grace_seconds}",
        f"--signals-to-handle={HANDLED_SIGNALS}",
    ]


def launch_command(spec: JobSpec, spec_path: str, rendezvous: list[str], python: str = "python") -> list[str]:
    """The command a node runs. `spec_path` is where the job sees the spec (the run dir, or /etc/mbl on k8s)."""
    return [python, "-m", "jobs.launch", "--spec", spec_path, "--", *torchrun_args(spec, rendezvous)]
