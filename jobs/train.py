"""Entry point on every rank: `python -m jobs.train --spec <run_dir>/spec.yaml` (under torchrun).

Dispatches on spec.kind: prepare (jobs/prepare.py: rank 0 tokenizes and packs), pretrain (jobs/pretrain.py:
MLM, optional SOP) or finetune (jobs/finetune.py: classification, NER, QA). Each training kind builds a
DeepSpeed engine from the spec (jobs/runtime.py), resumes from the newest complete checkpoint, and runs the
loop (jobs/loop.py): checkpoints every N steps and on SIGUSR1/SIGTERM or near MBL_DEADLINE (exit 75 =
requeue), and ends with final/, summary.json and DONE (written last).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher import contract
from launcher.loading import load_spec


def _keep_spec(spec, given: Path) -> None:
    """The run directory keeps the spec it runs. Slurm and local write it at submit; on Kubernetes the spec
    comes from a ConfigMap and the launcher cannot reach the volume, so rank 0 copies it in on first start."""
    from launcher.rundir import check_run_dir, write_spec

    target = Path(spec.run_dir) / contract.SPEC_FILE
    if target.exists() and target.resolve() == given.resolve():
        return
    if check_run_dir(spec) == "new":  # raises UsageError when the run dir holds a different job
        write_spec(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the resolved spec (normally <run_dir>/spec.yaml)")
    args = parser.parse_args(argv)
    from launcher.errors import MblError

    try:
        spec = load_spec(args.spec)
    except MblError as exc:
        print(exc.render() if hasattr(exc, "render") else str(exc), file=sys.stderr)
        return 2
    if (Path(spec.run_dir) / contract.DONE_FILE).exists():
        if os.environ.get("RANK", "0") == "0":
            print(f"[mbl] {spec.run_dir} is finished ({contract.DONE_FILE} exists); nothing to do", flush=True)
        return 0
    ctx = None
    try:
        from jobs.runtime import Context

        ctx = Context(spec)
        take_lease(ctx)  # one writer per run directory: before anything is written into it
        if ctx.rank == 0:
            _keep_spec(spec, Path(args.spec))
        if spec.kind == "prepare":
            from jobs.prepare import run_prepare

            return run_prepare(ctx)
        if spec.kind == "pretrain":
            from jobs.pretrain import run_pretrain

            return run_pretrain(ctx)
        from jobs.finetune import run_finetune

        return run_finetune(ctx)
    except MblError as exc:  # DataError, ResumeError, LeaseError, CheckpointError: a message, no traceback
        print(exc.render(), file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if ctx is not None and ctx.lease is not None:
            ctx.lease.release()


def take_lease(ctx) -> None:
    """Rank 0 takes the run directory's lease; every rank stops with LeaseError when another job holds it."""
    from jobs.lease import Lease

    lease = Lease(ctx.run_dir, ctx.log) if ctx.rank == 0 else None
    took = ctx.on_rank0(lambda: lease.acquire())
    ctx.lease = lease
    if took:
        ctx.log(took)


def _exit(code: int) -> None:
    """Leave together and without C++ teardown: after a success every rank meets at a barrier (rank 0 may still
    be writing final/), the process group is destroyed, and the process ends with os._exit, because gloo's and
    DeepSpeed's threads can abort ("terminate called without an active exception") in static destructors."""
    from jobs.tracking import close_trackers

    close_trackers(code)  # tracker runs end as killed (a requeue) or failed; os._exit skips atexit
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the exit code says how the job ended
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
