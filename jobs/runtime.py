"""What every kind of job shares on a rank: the Context (rank, device, run directory, logging), the DeepSpeed
engine built from the spec, batches moved to the engine's device, and the end of a run (summary, DONE).

The device is the rank's GPU (`cuda:<LOCAL_RANK>`, process group NCCL) when CUDA is available, else the CPU
(gloo). Loaders build batches on the host; jobs/device.py's `to_device` copies them to the engine's device
(pinned memory and non-blocking copies on CUDA), and every collective of the trainer runs on tensors of that
device, since NCCL reduces CUDA tensors only. `MBL_DEVICE_CHECK=1` turns on jobs/devicecheck.py, which fails
a run that breaks either rule, also on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from jobs.device import set_deterministic
from jobs.tracking import Tracker
from launcher import contract


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Context:
    """Rank, world size, device, the run directory and rank-0 logging (stdout, metrics.jsonl, TensorBoard)."""

    def __init__(self, spec):
        if spec.train.deterministic:
            set_deterministic()
        import deepspeed
        import torch

        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.spec = spec
        self.run_dir = Path(spec.run_dir)
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.tracker = Tracker(spec, self.run_dir, self.log, self.rank)  # MLflow / W&B (jobs/tracking.py), rank 0
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if os.environ.get("MBL_DEVICE_CHECK") == "1":
            from jobs import devicecheck

            devicecheck.install(self.device)
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", verbose=False,
                                   timeout=timedelta(seconds=spec.distributed.collective_timeout_seconds))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))))
        self.start = time.time()
        self.lease = None  # rank 0: the run directory's lease (jobs/lease.py), taken by jobs.train before writing
        self._tb = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if spec.train.deterministic:
            self.log(f"deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']})")

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[mbl] {message}", flush=True)

    def record(self, row: dict) -> None:
        """One metrics.jsonl line and TensorBoard scalars (rank 0)."""
        if self.rank != 0:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.run_dir / contract.METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        prefix = row.get("split", "train")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step", "time", "total_steps"):
                self._tb.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))
        self._tb.flush()
        self.tracker.record(row)

    def on_rank0(self, fn):
        """Run fn on rank 0 only; every rank gets its result, or raises its user error."""
        import torch.distributed as dist

        from jobs.errors import DataError

        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except DataError as exc:
                box[0] = ("error", (str(exc), exc.hint))
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise DataError(*box[0][1])
        return box[0][1]


# ---- DeepSpeed ------------------------------------------------------------------------------------


def lr_lambda(spec, total_steps: int):
    """Warmup, then linear decay (default), cosine decay, or warmup-stable-decay; as a share of lr."""
    t = spec.train
    warm, floor = t.warmup_steps, t.min_lr_ratio

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        if t.schedule == "linear":
            return floor + (1 - floor) * max(0.0, 1 - progress)
        if t.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        decay_start = total_steps - int(round(t.decay_fraction * total_steps))  # wsd
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / max(1, total_steps - decay_start))

    return fn


def compile_encoder(model) -> None:
    """torch.compile the encoder in place, so parameter names (checkpoints, exports) stay the same. Only the
    encoder: the MLM head gathers the masked positions, a data-dependent shape that breaks a graph."""
    getattr(model, "model", model).compile()


def build_engine(ctx: Context, model, total_steps: int, accum: int):
    """The DeepSpeed engine of the spec (ZeRO stage, precision, AdamW, schedule); its device is ctx.device."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    spec, t = ctx.spec, ctx.spec.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.compile:
        compile_encoder(model)
        ctx.log("train.compile: the encoder is compiled (inductor) during its first steps")
    config = {
        "train_batch_size": t.micro_batch_size * ctx.world * accum,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": spec.distributed.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if spec.distributed.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config,
                                           lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(spec, total_steps)))
    if engine.device != ctx.device:
        raise RuntimeError(f"DeepSpeed placed the model on {engine.device}, this rank's device is {ctx.device}")
    return engine


def accumulation(ctx: Context) -> int:
    from jobs.errors import DataError

    t = ctx.spec.train
    per_step = t.micro_batch_size * ctx.world
    if t.global_batch_size % per_step:
        raise DataError(f"train.global_batch_size {t.global_batch_size} is not a multiple of micro batch "
                        f"{t.micro_batch_size} x {ctx.world} ranks", "match distributed.* to the ranks started")
    return t.global_batch_size // per_step


def parameter_count(module) -> int:
    """Parameters of the whole model, also when ZeRO-3 holds only a partition of each on this rank."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def full_state_dict(engine, stage: int) -> dict | None:
    """The whole model's weights in fp32 on rank 0 (ZeRO-3 gathers the partitions); None elsewhere."""
    import torch.distributed as dist

    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if state is None:
        return None
    return {k: v.detach().float().clone().cpu() for k, v in state.items()}


# ---- the end of a run -----------------------------------------------------------------------------


def finish(ctx: Context, summary: dict) -> None:
    """summary.json, the summary as a table in the log (launcher/summary.py), then DONE (last)."""
    from jobs import devicecheck
    from launcher.summary import summary_text

    if devicecheck.installed():
        ctx.log(devicecheck.report())
    if ctx.rank == 0:
        summary = {**summary, "run_dir": str(ctx.run_dir), "wall_seconds": round(time.time() - ctx.start, 1)}
        (ctx.run_dir / contract.SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        lines = [f"summary ({contract.SUMMARY_FILE} in the run directory):", *summary_text(summary)]
        print("\n".join(f"[mbl] {line}" for line in lines), flush=True)
        ctx.tracker.finish(summary)  # the summary, and the tracker runs closed as finished
        (ctx.run_dir / contract.DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
