"""Per node: run torchrun, classify how it ended, exit with one code per outcome.

    python -m jobs.launch --spec SPEC -- <torchrun args>

runs `torchrun <torchrun args> -m jobs.train --spec SPEC` in this process (the arguments come from
`launcher.torchrun`, the one place that builds them), classifies the end of the attempt with the table in
`launcher.outcomes` (done / requeue / failed), records it in the run directory (and, in a Kubernetes pod,
in the termination message) and exits with the contract's code for it, which every backend reads the same
way: the local backend's status, the Slurm script's requeue decision, the training operator's ExitCode
restart policy on Kubernetes.

It also names the attempt for the ranks (MBL_JOB_ID, MBL_ATTEMPT: the owner of the run directory's lease).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from launcher import contract
from launcher.outcomes import classify, crash_restarts, newest_step, records, write_record

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def identity(spec) -> tuple[str, int]:
    """(job id, attempt) of this run: from the backend's variables, else made up on this host."""
    job = (os.environ.get("MBL_JOB_ID") or os.environ.get("SLURM_JOB_ID")
           or f"{socket.gethostname()}-{os.getppid()}")
    attempt = os.environ.get("MBL_ATTEMPT") or os.environ.get("SLURM_RESTART_COUNT")
    if attempt is None or not attempt.isdigit():
        earlier = [r.get("attempt", -1) for r in records(Path(spec.run_dir)) if r.get("job") == job]
        return job, max(earlier, default=-1) + 1
    return job, int(attempt)


def max_restarts(spec) -> int:
    """Restarts allowed after failures: slurm.max_restarts or k8s.max_restarts; the local backend restarts nothing."""
    backend = os.environ.get("MBL_BACKEND", "local")
    return {"slurm": spec.slurm.max_restarts, "k8s": spec.k8s.max_restarts}.get(backend, 0)


def _early_signal(signum: int, _frame: object) -> None:
    """Before torchrun installs its own handlers: the same exception its handler raises."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def compatible_args(torchrun_args: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments this torch's torchrun knows, those it does not), dropping `--option=value` ones it lacks.

    launcher.torchrun writes for the newest torchrun (it never imports torch); an image may carry an older one.
    torchrun before 2.13 has no --shutdown-timeout: the grace it would give ranks to save after a SIGTERM goes to
    the default of the process context's close() instead (30 s there, hard-coded), so preemption saves keep it.
    """
    from torch.distributed.run import get_args_parser

    known = {flag for action in get_args_parser()._actions for flag in action.option_strings}
    keep, dropped = [], []
    for arg in torchrun_args:
        flag = arg.split("=", 1)[0]
        (dropped if flag.startswith("--") and "=" in arg and flag not in known else keep).append(arg)
    for arg in dropped:
        if arg.startswith("--shutdown-timeout="):
            from torch.distributed.elastic.multiprocessing.api import PContext

            PContext.close.__defaults__ = (None, int(arg.split("=", 1)[1]))
    return keep, dropped


def run_torchrun(torchrun_args: list[str]) -> tuple[dict[int, int], str | None, str | None]:
    """torchrun in this process: (failed ranks' exit codes, the signal this node got, torchrun's own error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        return {int(rank): int(f.exitcode) for rank, f in exc.failures.items()}, None, None
    except SignalException as exc:
        return {}, exc.sigval.name, None
    except Exception as exc:  # noqa: BLE001 - a rendezvous or agent failure: classified as a crash
        return {}, None, f"torchrun: {type(exc).__name__}: {exc}"
    return {}, None, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, torchrun_args = argv[:cut], argv[cut + 1:]
    else:
        own, torchrun_args = argv, []
    parser = argparse.ArgumentParser(prog="python -m jobs.launch", description=__doc__.splitlines()[0],
                                     usage="python -m jobs.launch --spec SPEC -- <torchrun args>")
    parser.add_argument("--spec", required=True, help="the resolved spec, as the job sees it")
    args = parser.parse_args(own)

    from launcher.errors import MblError
    from launcher.loading import load_spec

    try:
        spec = load_spec(args.spec)
    except MblError as exc:
        print(exc.render(), file=sys.stderr, flush=True)
        return contract.LAUNCH_FAILED
    run_dir = Path(spec.run_dir)
    job, attempt = identity(spec)
    os.environ["MBL_JOB_ID"], os.environ["MBL_ATTEMPT"] = job, str(attempt)  # the ranks' lease owner
    before, host = newest_step(run_dir), socket.gethostname()
    started = time.time()
    print(f"mbl launch: job {job} attempt {attempt} on {host}: torchrun {' '.join(torchrun_args)}",
          file=sys.stderr, flush=True)
    torchrun_args, dropped = compatible_args(torchrun_args)
    if dropped:
        import torch

        print(f"mbl launch: torchrun of torch {torch.__version__} lacks {' '.join(dropped)}: "
              "its default close() timeout carries the shutdown grace instead", file=sys.stderr, flush=True)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _early_signal)
    try:
        codes, got_signal, error = run_torchrun([*torchrun_args, "-m", "jobs.train", "--spec", args.spec])
    except Exception as exc:  # noqa: BLE001 - a signal before torchrun took over, or an import failure
        name = getattr(getattr(exc, "sigval", None), "name", None)
        codes, got_signal, error = {}, name, None if name else f"{type(exc).__name__}: {exc}"
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # the outcome is decided: record it whatever comes now
    after = newest_step(run_dir)
    result = classify(codes, got_signal, error, before, after, crash_restarts(run_dir, job), max_restarts(spec))
    write_record(run_dir, {"job": job, "attempt": attempt, "host": host, "pid": os.getpid(),
                           "time": round(time.time(), 3),
                           "seconds": round(time.time() - started, 1), "step_before": before, "step_after": after,
                           "exit_code": result.exit_code, **asdict(result)})
    print(f"mbl launch: {result.outcome} (exit {result.exit_code}): {result.reason}", file=sys.stderr, flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
