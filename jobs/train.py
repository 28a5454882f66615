"""Entry point on every rank: `python -m jobs.train --spec <run_dir>/spec.yaml` (under torchrun).

Dispatches on spec.kind: prepare (rank 0 tokenizes and packs), pretrain (MLM, optional SOP) or finetune
(classification, NER, QA). Each training kind builds a DeepSpeed engine from the spec, resumes from the
newest complete checkpoint, checkpoints every N steps and on SIGUSR1/SIGTERM or near MBL_DEADLINE
(exit 75 = requeue), and ends with final/, summary.json and DONE (written last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

from launcher import contract
from launcher.loading import load_spec

BEST_DIR = "best"  # finetune: the best model so far, a Hugging Face folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Context:
    """Rank, world size, the run directory and rank-0 logging (stdout, metrics.jsonl, TensorBoard)."""

    def __init__(self, spec):
        import deepspeed
        import torch

        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.spec = spec
        self.run_dir = Path(spec.run_dir)
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", verbose=False)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))))
        self.start = time.time()
        self._tb = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

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
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                self._tb.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))
        self._tb.flush()

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


def build_engine(ctx: Context, model, total_steps: int, accum: int):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    spec, t = ctx.spec, ctx.spec.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    return engine


def accumulation(ctx: Context) -> int:
    from jobs.errors import DataError

    t = ctx.spec.train
    per_step = t.micro_batch_size * ctx.world
    if t.global_batch_size % per_step:
        raise DataError(f"train.global_batch_size {t.global_batch_size} is not a multiple of micro batch "
                        f"{t.micro_batch_size} x {ctx.world} ranks", "match distributed.* to the ranks started")
    return t.global_batch_size // per_step


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


# ---- the training loop shared by pretrain and finetune -----------------------------------------------


class Loop:
    """Steps, logging, periodic checkpoints, evaluation hooks, and the stop flag: one run of a kind."""

    def __init__(self, ctx: Context, engine, total_steps: int, accum: int, batch_fn, tokens_per_step: int,
                 greater_is_better: bool):
        from jobs.checkpoint import Checkpointer, StopFlag

        self.ctx, self.engine, self.total, self.accum = ctx, engine, total_steps, accum
        self.batch_fn, self.tokens_per_step = batch_fn, tokens_per_step
        self.ckpt = Checkpointer(ctx.run_dir, ctx.spec, ctx.rank, ctx.world, ctx.log)
        self.ckpt.greater_is_better = greater_is_better
        self.flag = StopFlag()
        self.greater = greater_is_better
        self.state = {"step": 0, "tokens": 0, "metric": None, "best_metric": None, "best_step": None,
                      "bad_evals": 0, "fingerprint": ctx.spec.training_fingerprint(), "world_size": ctx.world,
                      "kind": ctx.spec.kind, "extra": {}}
        self.resumed_from = None

    def resume(self) -> bool:
        path = self.ckpt.find()
        if path is None:
            return False
        self.state, rank_state = self.ckpt.load(self.engine, path)
        saved, here = rank_state.get("position"), self.batch_position(self.state["step"])
        if saved is not None and saved != here:  # the batcher seeks from the step: it must land where the save was
            from jobs.errors import ResumeError

            raise ResumeError(f"{path}: rank {self.ctx.rank} saved data position {saved}, but this data gives {here} "
                              "at that step: the prepared data changed", "point data.prepared at the data the run "
                              "started with, or start a new run")
        self.resumed_from = path
        self.ctx.log(f"resumed from {path.relative_to(self.ctx.run_dir)} at step {self.state['step']}")
        return True

    def save(self) -> None:
        t0 = time.time()
        self.ckpt.save(self.engine, dict(self.state), {"position": self.batch_position(self.state["step"])})
        self.ctx.log(f"checkpoint step {self.state['step']} saved in {time.time() - t0:.1f}s")

    def batch_position(self, step: int) -> dict:
        return {"step": step, "rank": self.ctx.rank}

    def improved(self, value: float) -> bool:
        best = self.state["best_metric"]
        return best is None or (value > best if self.greater else value < best)

    def run(self, evaluate, eval_every: int) -> int:
        """Train to the end (returns 0) or until a stop request (saves, returns REQUEUE_EXIT_CODE)."""
        import torch
        import torch.distributed as dist

        ctx, engine, spec = self.ctx, self.engine, self.ctx.spec
        every = spec.checkpoint.every_steps
        bar = None
        if ctx.rank == 0 and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.state["step"], unit="step")
        engine.train()
        t_log, step_seconds, window_loss, window_n = time.time(), 0.0, 0.0, 0
        while self.state["step"] < self.total:
            step, t0 = self.state["step"], time.time()
            loss_sum = 0.0
            for m in range(self.accum):
                out = engine(**self.batch_fn(step, m))
                engine.backward(out.loss)
                engine.step()
                loss_sum += float(out.loss.detach())
            step += 1
            self.state["step"], self.state["tokens"] = step, self.state["tokens"] + self.tokens_per_step
            step_seconds = time.time() - t0
            window_loss, window_n = window_loss + loss_sum / self.accum, window_n + 1
            if bar:
                bar.update(1)
            if step % spec.train.log_every_steps == 0 or step == self.total:
                loss = torch.tensor([window_loss / window_n])
                dist.all_reduce(loss)
                elapsed = time.time() - t_log
                norm = engine.get_global_grad_norm()
                row = {"step": step, "loss": float(loss) / ctx.world, "lr": engine.get_lr()[0],
                       "grad_norm": float(norm) if norm is not None else None,
                       "tokens_per_s": self.tokens_per_step * window_n / max(elapsed, 1e-9), "tokens": self.state["tokens"]}
                if ctx.cuda:
                    params = sum(p.numel() for p in engine.module.parameters())
                    peak = float(os.environ.get("MBL_PEAK_TFLOPS", "989")) * 1e12 * ctx.world
                    row["mfu"] = 6 * params * row["tokens_per_s"] / peak
                ctx.record(row)
                if bar:
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                t_log, window_loss, window_n = time.time(), 0.0, 0
            if step % eval_every == 0 and step < self.total:
                if evaluate(step) == "stop":
                    ctx.log("early stopping: no improvement")
                    break
            if step % every == 0 and step < self.total:
                self.save()
            stop, reason = self.flag.should_stop(self.ckpt.save_seconds, step_seconds)
            if stop:
                ctx.log(f"stopping at step {step}: {reason}; saving and exiting {contract.REQUEUE_EXIT_CODE}")
                if step % every != 0:
                    self.save()
                if bar:
                    bar.close()
                return contract.REQUEUE_EXIT_CODE
        if bar:
            bar.close()
        return 0


# ---- kinds ----------------------------------------------------------------------------------------


def finish(ctx: Context, summary: dict) -> None:
    """summary.json, the summary line, then DONE (last)."""
    if ctx.rank == 0:
        summary = {**summary, "run_dir": str(ctx.run_dir), "wall_seconds": round(time.time() - ctx.start, 1)}
        (ctx.run_dir / contract.SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        print("[mbl] summary: " + json.dumps(summary), flush=True)
        (ctx.run_dir / contract.DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def run_prepare(ctx: Context) -> int:
    from jobs import data

    out = ctx.run_dir / contract.DATA_DIR
    index = ctx.on_rank0(lambda: data.prepare(ctx.spec, out, ctx.log))
    finish(ctx, {"kind": "prepare", "data_dir": str(out), "train_sequences": index["splits"]["train"]["sequences"],
                 "heldout_sequences": index["splits"]["heldout"]["sequences"], "dtype": index["dtype"],
                 "vocab_size": index["vocab_size"]})
    return 0


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
    try:
        ctx = Context(spec)
        if ctx.rank == 0:
            _keep_spec(spec, Path(args.spec))
        if spec.kind == "prepare":
            return run_prepare(ctx)
        if spec.kind == "pretrain":
            from jobs.pretrain import run_pretrain

            return run_pretrain(ctx)
        from jobs.finetune import run_finetune

        return run_finetune(ctx)
    except MblError as exc:  # DataError, ResumeError, CheckpointError (a full disk): a message, no traceback
        print(exc.render(), file=sys.stderr, flush=True)
        return exc.exit_code


def _exit(code: int) -> None:
    """Leave together and without C++ teardown: after a success every rank meets at a barrier (rank 0 may still
    be writing final/), the process group is destroyed, and the process ends with os._exit, because gloo's and
    DeepSpeed's threads can abort ("terminate called without an active exception") in static destructors."""
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
