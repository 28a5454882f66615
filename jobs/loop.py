"""The training loop shared by pretrain and finetune: steps, logging, periodic checkpoints, evaluation hooks
and the stop flag.

Each micro batch is built on the host by the kind's batch function and moved to the engine's device here.
The loss stays on the device: it is summed there over the micro steps of a log interval and read once per
interval, after one all_reduce, so a step never waits for the GPU to finish; the stop flag's all_reduce is read
a boundary later for the same reason (jobs/checkpoint.py StopFlag). A metrics row holds loss, lr,
gradient norm, tokens/s, the total of steps and `data_share` (the share of the interval's wall time this rank's
host spent building micro batches and starting their copies to the device: the loader's cost to the step), and is printed too (launcher/progress.py `step_line`); on CUDA
also the peak memory allocated (GiB) and the model FLOPs utilization:
6 x parameters x tokens/s over the GPUs' peak (env MBL_PEAK_TFLOPS per GPU, default 989, an H100's or
H200's dense bf16; attention FLOPs are not counted). tokens/s counts the time of the training steps only,
not that of evaluations and checkpoint saves inside the interval.

Periodic checkpoints go to the background when checkpoint.async_save is on (jobs/checkpoint.py): the step
waits only for the copy of the state to host memory, and the steps after it train while the write runs (a
slower step then shows in tokens/s). Each step boundary polls the write in flight; a stop request saves
blocking and waits for any write in flight, and so does the end of the run, so that the process never ends
before its last checkpoint is durable.
"""

from __future__ import annotations

import os
import sys
import time

from jobs.device import to_device
from jobs.watchdog import Watchdog, fault_hang
from jobs.runtime import Context, parameter_count
from launcher import contract
from launcher.progress import step_line

DEFAULT_PEAK_TFLOPS = 989.0


class Loop:
    """Steps, logging, periodic checkpoints, evaluation hooks, and the stop flag: one run of a kind."""

    def __init__(self, ctx: Context, engine, total_steps: int, accum: int, batch_fn, tokens_per_step: int,
                 greater_is_better: bool):
        from jobs.checkpoint import Checkpointer, StopFlag

        self.ctx, self.engine, self.total, self.accum = ctx, engine, total_steps, accum
        self.device = engine.device
        self.batch_fn, self.tokens_per_step = batch_fn, tokens_per_step
        self.ckpt = Checkpointer(ctx.run_dir, ctx.spec, ctx.rank, ctx.world, ctx.log, device=self.device)
        self.ckpt.greater_is_better = greater_is_better
        if ctx.lease is not None:
            self.ckpt.before_commit = ctx.lease.check
        self.flag = StopFlag(self.device)
        self.greater = greater_is_better
        self.state = {"step": 0, "tokens": 0, "metric": None, "best_metric": None, "best_step": None,
                      "bad_evals": 0, "fingerprint": ctx.spec.training_fingerprint(), "world_size": ctx.world,
                      "kind": ctx.spec.kind, "extra": {}}
        self.resumed_from = None
        self._params: int | None = None  # for MFU, counted at the first log on CUDA
        self.train_seconds, self.steps_run = 0.0, 0  # this attempt's training steps, for its mean tokens/s
        self.paused = 0.0  # seconds of evaluation and saving after the last step

    @property
    def tokens_per_s(self) -> float | None:
        """Mean tokens/s of this attempt's training steps (evaluations and saves left out)."""
        if not self.steps_run or self.train_seconds <= 0:
            return None
        return self.steps_run * self.tokens_per_step / self.train_seconds

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

    def save(self, background: bool = False) -> None:
        """A checkpoint of this step: durable on return, or (background) written while training goes on."""
        self.ckpt.save(self.engine, dict(self.state), {"position": self.batch_position(self.state["step"])},
                       background=background)

    def batch_position(self, step: int) -> dict:
        return {"step": step, "rank": self.ctx.rank}

    def improved(self, value: float) -> bool:
        best = self.state["best_metric"]
        return best is None or (value > best if self.greater else value < best)

    def _device_metrics(self, tokens_per_s: float) -> dict:
        """Peak memory and MFU of this rank's GPU (rank 0's stands for all: the ranks run the same shapes)."""
        import torch

        if self._params is None:
            self._params = parameter_count(self.engine.module)
        peak = float(os.environ.get("MBL_PEAK_TFLOPS", DEFAULT_PEAK_TFLOPS)) * 1e12 * self.ctx.world
        return {"max_memory_gib": round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 3),
                "mfu": 6 * self._params * tokens_per_s / peak}

    def run(self, evaluate, eval_every: int) -> int:
        """Train to the end (returns 0) or until a stop request (saves, returns REQUEUE_EXIT_CODE); a rank that
        makes no progress for the hang limit exits HANG_EXIT_CODE with its stacks in the log (jobs/watchdog.py)."""
        from jobs import preflight

        d = self.ctx.spec.distributed
        if preflight.wanted(self.ctx.spec, self.ctx.world):
            code = preflight.run(self.ctx, parameter_count(self.engine.module))
            if code is not None:
                return code
        self.watchdog = Watchdog(self.ctx.rank, d.hang_timeout_seconds, d.collective_timeout_seconds, self.ctx.log)
        try:
            return self._run(evaluate, eval_every)
        finally:
            self.watchdog.stop()

    def _run(self, evaluate, eval_every: int) -> int:
        import torch
        import torch.distributed as dist

        ctx, engine, spec = self.ctx, self.engine, self.ctx.spec
        every = spec.checkpoint.every_steps
        bar = None
        if ctx.rank == 0 and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.state["step"], unit="step")
        engine.train()
        # Summed on the device over the micro steps of a log interval; read once per interval.
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        t_log, paused, step_seconds, window_n, data_seconds = time.time(), 0.0, 0.0, 0, 0.0
        while self.state["step"] < self.total:
            step, t0 = self.state["step"], time.time()
            fault_hang(ctx.rank, step)
            for m in range(self.accum):
                t_data = time.perf_counter()
                batch = to_device(self.batch_fn(step, m), self.device)
                data_seconds += time.perf_counter() - t_data
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
                window_loss += out.loss.detach()
            step += 1
            self.state["step"], self.state["tokens"] = step, self.state["tokens"] + self.tokens_per_step
            step_seconds = time.time() - t0
            self.watchdog.beat(step, step_seconds)
            self.train_seconds, self.steps_run = self.train_seconds + step_seconds, self.steps_run + 1
            window_n += 1
            if bar:
                bar.update(1)
            if step % spec.train.log_every_steps == 0 or step == self.total:
                loss = (window_loss / (window_n * self.accum)).reshape(1)
                dist.all_reduce(loss)
                loss_value = loss.item() / ctx.world  # waits for the interval's steps: the time below is theirs
                elapsed = max(time.time() - t_log - paused, 1e-9)
                norm = engine.get_global_grad_norm()
                row = {"step": step, "total_steps": self.total, "loss": loss_value, "lr": engine.get_lr()[0],
                       "grad_norm": float(norm) if norm is not None else None,
                       "tokens_per_s": self.tokens_per_step * window_n / elapsed, "tokens": self.state["tokens"],
                       "data_share": round(data_seconds / elapsed, 4)}
                if self.device.type == "cuda":
                    row.update(self._device_metrics(row["tokens_per_s"]))
                ctx.record(row)
                ctx.log(step_line(row))  # the training loss in the log, every log_every_steps
                if bar:
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                window_loss.zero_()
                t_log, paused, window_n, data_seconds = time.time(), 0.0, 0, 0.0
            with self.watchdog.long():  # evaluations and saves: the long limit
                code = self._between_steps(step, evaluate, eval_every, every, step_seconds)
            if code is not None:
                if bar:
                    bar.close()
                return code
            paused += self.paused  # evaluations and saves only: the stop flag's collective is a step's cost
        self.flag.drain()
        with self.watchdog.long():  # the last periodic save is durable (or its error raised) before final/, DONE
            self.ckpt.wait()
        if bar:
            bar.close()
        return 0

    def _between_steps(self, step: int, evaluate, eval_every: int, every: int, step_seconds: float) -> int | None:
        """Evaluation, periodic save, stop request after a step: an exit code to return, or None to go on."""
        ctx, spec = self.ctx, self.ctx.spec
        t0, self.paused = time.time(), 0.0
        if step % eval_every == 0 and step < self.total:
            if evaluate(step) == "stop":
                ctx.log("early stopping: no improvement")
                self.flag.drain()
                self.ckpt.wait()
                return 0
        saving = step % every == 0 and step < self.total
        if saving:
            self.save(background=spec.checkpoint.async_save)  # waits for the previous save's write first
        self.paused = time.time() - t0  # evaluation and save: left out of tokens/s
        if not saving:
            self.ckpt.poll()  # a background save whose write is over on every rank: logged, or its error raised
        stop, reason = self.flag.should_stop(self.ckpt.save_seconds, step_seconds)
        if stop:
            ctx.log(f"stopping at step {step}: {reason}; saving and exiting {contract.REQUEUE_EXIT_CODE}")
            self.flag.drain()
            if step % every != 0:
                self.save()  # blocks until durable (after the write in flight, if any)
            self.ckpt.wait()  # this step's save, when it went to the background: durable before the exit
            return contract.REQUEUE_EXIT_CODE
        return None
