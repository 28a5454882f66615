"""A short check of every node before the first step of an attempt (distributed.preflight: unset = multi-node
attempts only, true, false). On every rank:

1. accelerator: a matrix product on the engine's device completes (CUDA: synchronized); on the CPU, a no-op;
2. all-reduce: `distributed.preflight_allreduce_mb` MB (unset: 256 on GPUs, 16 on CPUs) on device tensors, timed;
   rank 0 logs the bus bandwidth
   (2 (n-1)/n x bytes / seconds, the figure nccl-tests print);
3. shared storage: rank 0 writes a random token into the run directory, every rank reads it back: a rank that
   sees another (or no) file has the run directory on storage the others do not share;
4. room: the run directory's file system has room for one checkpoint (16 bytes per parameter: weights and
   AdamW's fp32 master copy and moments, over all ranks), plus 10%.

Results are all-gathered, so every rank knows every host's. If any check failed anywhere, rank 0 names each
failed host and check in the log and in `logs/bad-nodes-<job>` (one host per line, appended), and every rank
exits with the contract's NODE_EXIT_CODE: jobs.launch requeues the attempt (launcher/outcomes.py), and the
Slurm script excludes those hosts from the next one (up to slurm.max_node_exclusions).

Fault point for tests: MBL_FAULT_PREFLIGHT=<host>:<check>[@<attempt>] fails that check on that host ("*": any).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from launcher import contract

BYTES_PER_PARAMETER = 16
BAD_NODES_PREFIX = "bad-nodes-"


def wanted(spec, world: int) -> bool:
    """distributed.preflight, or (unset) whether this attempt spans more than one node."""
    if spec.distributed.preflight is not None:
        return spec.distributed.preflight
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", world))


def job_file_name() -> str:
    """MBL_JOB_ID as a file name: a Kubernetes job is `k8s:<namespace>/<name>` (launcher/outcomes.py does the
    same for its records); a Slurm job id stays as it is, which the batch script relies on."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("MBL_JOB_ID", "job"))


def node_name() -> str:
    """The scheduler's name of this node (what Slurm's --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _fault(host: str, check: str) -> str | None:
    spec = os.environ.get("MBL_FAULT_PREFLIGHT")
    if not spec:
        return None
    target, attempt = (spec.split("@", 1) + [None])[:2]
    if attempt is not None and attempt != os.environ.get("MBL_ATTEMPT", "0"):
        return None
    want_host, _, want_check = target.partition(":")
    if want_host in ("*", host) and want_check == check:
        return f"MBL_FAULT_PREFLIGHT={spec}"
    return None


def run(ctx, parameters: int) -> int | None:
    """The checks on this rank; None when every host passed, else NODE_EXIT_CODE (after logging why)."""
    import torch
    import torch.distributed as dist

    host, device, t0 = node_name(), ctx.device, time.time()
    failures: list[str] = []

    def check(name: str, fn) -> None:
        fault = _fault(host, name)
        try:
            if fault:
                raise RuntimeError(fault)
            fn()
        except Exception as exc:  # noqa: BLE001 - any failure of a check is this node's: named, not raised
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:300])

    def accelerator() -> None:
        if device.type == "cuda":
            a = torch.randn(1024, 1024, device=device)
            (a @ a).sum().item()
            torch.cuda.synchronize(device)

    check("accelerator", accelerator)
    size = (ctx.spec.distributed.preflight_allreduce_mb or (256 if device.type == "cuda" else 16)) * 2 ** 20
    buf = torch.ones(size // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buf)  # warm-up (connections), then timed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    n = ctx.world
    busbw = 2 * (n - 1) / n * size / max(seconds, 1e-9) / 1e9
    got = float(buf[0].item())
    del buf
    check("all-reduce", lambda: _expect(got == float(n) ** 2, f"an all-reduce of ones twice gave {got}, not {n ** 2}"))

    token_file = ctx.run_dir / f".preflight-{job_file_name()}-{os.environ.get('MBL_ATTEMPT', 0)}"
    box = [secrets.token_hex(16) if ctx.rank == 0 else None]
    if ctx.rank == 0:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        token_file.write_text(box[0])
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    check("shared storage", lambda: _expect(_read(token_file) == box[0], f"{ctx.run_dir} on {host} does not hold "
                                            "rank 0's token: the run directory is not the same shared directory"))
    need = int(parameters * BYTES_PER_PARAMETER * 1.1)
    check("room", lambda: _expect(shutil.disk_usage(_existing(ctx.run_dir)).free >= need,
                                  f"{_existing(ctx.run_dir)} has {shutil.disk_usage(_existing(ctx.run_dir)).free / 2**30:.1f} "
                                  f"GiB free, a checkpoint needs about {need / 2**30:.1f} GiB"))
    every: list = [None] * n
    dist.all_gather_object(every, (ctx.rank, host, failures))
    dist.barrier()
    if ctx.rank == 0:
        token_file.unlink(missing_ok=True)
    bad = {(h, f) for _, h, fs in every for f in fs}
    if not bad:
        ctx.log(f"preflight: {n} ranks on {len({h for _, h, _ in every})} host(s) passed in {time.time() - t0:.2f}s; "
                f"all-reduce of {size >> 20} MB: {seconds * 1e3:.0f} ms, bus bandwidth {busbw:.2f} GB/s")
        return None
    if ctx.rank == 0:
        hosts = sorted({h for h, _ in bad})
        for h, f in sorted(bad):
            ctx.log(f"preflight FAILED on {h}: {f}")
        logs = ctx.run_dir / contract.LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{BAD_NODES_PREFIX}{job_file_name()}", "a") as out:
            out.write("".join(f"{h}\n" for h in hosts))
        ctx.log(f"preflight: bad node(s) {', '.join(hosts)}; exiting {contract.NODE_EXIT_CODE} (requeue without them)")
    return contract.NODE_EXIT_CODE


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
