"""Training time lost per checkpoint save, and checkpoint write throughput against `dd` on the same disk.

    python bench/bench_checkpoint.py [--preset base large] [--trials 3] [--steps 8] [--threads 1] [--out r.json]
    python bench/bench_checkpoint.py --summarize r.json

One process, one rank (gloo, CPU): ModernBERT `--preset` built from its config (the full 50,368-token
vocabulary, no hub download), DeepSpeed ZeRO-1, fp32, AdamW, as the trainer builds it (jobs/runtime.py
build_engine); one micro batch of 1 x 64 random tokens per step, `--threads` torch threads (default 1: a GPU
trainer's host side is one thread, and the machine's other core is what a writer thread gets beside it). A
checkpoint is 16 bytes per parameter (fp32 weights, fp32 master copy, two Adam moments).

Each trial, for each way of saving (in an order that turns from trial to trial): `os.sync()` and
`--cooldown` seconds of quiet, a window of `--steps` timed training steps without a save, then a window of
`--steps` timed steps that begins with a save at its first step boundary:

    deepspeed   engine.save_checkpoint alone: DeepSpeed's synchronous save (no fsync, no hashes, no `latest`)
    blocking    Checkpointer.save(background=False): hashed, fsynced, manifest, COMPLETE, rename, `latest`
    background  Checkpointer.save(background=True): blocks for the copy to host memory; the write runs while
                the window's steps train (Checkpointer.poll at every step boundary, as the loop does), and the
                window ends with Checkpointer.wait (whatever is still unwritten then counts as lost too)

Training time lost to a save, two estimates:
- adjacent (the one reported): the time the save call blocked + the final wait + how much longer the steps
  that ran while the write was in flight took than the steps of the same window after it was durable (for a
  save that blocks until durable, no step runs beside the write, so this is the blocked time). Neighbouring
  steps see about the same load from the rest of the machine.
- window against window: blocked + the window's steps + the final wait, minus `--steps` times the median
  step of the window without a save just before it. Honest but, on a machine whose load moves by 2x within
  a minute, noisier than the effect.
The quiet before each pair matters on this VM: after a large flush the host's
own writeback slows the guest's cores for tens of seconds, and DeepSpeed's save (no fsync) would otherwise
hand that cost to whichever window came next. Then `dd if=/dev/zero of=<work>/dd.bin bs=1M count=<checkpoint
size> conv=fsync` into the same folder. Throughput is checkpoint bytes over the time from the start of the
save to the checkpoint being durable and `latest` (background: with the window's steps training beside it);
DeepSpeed's save is not durable when it returns (no fsync), so its figure flatters it.

Every number is reported per trial, and as median, min and max: other sessions' tests share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ = 64
THREADS = [1]


def build(preset: str, work: Path, precision: str = "fp32"):
    import torch

    from jobs.model import ModernBertForPreTraining, build_config
    from jobs.runtime import Context, build_engine
    from launcher.loading import load_spec
    from launcher.spec import MODERNBERT_VOCAB

    run = work / preset
    if run.exists():
        shutil.rmtree(run)
    spec = load_spec(REPO / "examples/pretrain-tiny.yaml", sets=[
        f"model.preset={preset}", f"checkpoint.dir={run}", "distributed.gpus_per_node=1", "train.max_steps=100000",
        "train.global_batch_size=1", "train.micro_batch_size=1", "train.warmup_steps=0", f"data.seq_len={SEQ}",
        "checkpoint.keep_last=1000", f"train.precision={precision}"]).resolved(REPO)
    ctx = Context(spec)
    torch.set_num_threads(THREADS[0])
    special = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4}
    torch.manual_seed(0)
    config = build_config(preset, {}, MODERNBERT_VOCAB, special, SEQ)
    config.architectures = ["ModernBertForMaskedLM"]
    model = ModernBertForPreTraining(config)
    engine = build_engine(ctx, model, 100000, 1)
    ids = torch.randint(5, MODERNBERT_VOCAB, (1, SEQ))
    labels = torch.where(torch.rand(1, SEQ) < 0.3, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return ctx, spec, engine, batch


def train_step(engine, batch) -> None:
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dd(folder: Path, nbytes: int) -> float:
    target = folder / "dd.bin"
    megabytes = max(1, round(nbytes / 2 ** 20))
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                          capture_output=True, text=True, check=True)
    target.unlink()
    return megabytes * 2 ** 20 / float(re.search(r"copied, ([0-9.]+) s", proc.stderr).group(1)) / 1e6


def settle(seconds: float) -> None:
    """Every dirty page to the disk, then a pause: on this VM the host's writeback of a large flush slows the
    guest's cores for a while after the guest's fsync returned, so each pair of windows starts from quiet."""
    os.sync()
    time.sleep(seconds)


def bench(preset: str, trials: int, steps: int, work: Path, cooldown: float, precision: str = "fp32") -> dict:
    from jobs.checkpoint import Checkpointer, step_name

    ctx, spec, engine, batch = build(preset, work, precision)
    ckpt = Checkpointer(ctx.run_dir, spec, 0, 1, log=lambda m: None)
    plain = ctx.run_dir / "deepspeed"
    params = sum(p.numel() for p in engine.module.parameters())
    for _ in range(2):  # warm-up: allocator, threads
        train_step(engine, batch)
    counter = [0]

    def window(mode: str | None) -> dict:
        counter[0] += 1
        n = counter[0]
        state = {"step": n, "tokens": 0, "metric": None, "best_metric": None, "best_step": None}
        out: dict = {"blocked_s": 0.0, "end_wait_s": 0.0}
        os.sync()
        t0 = time.perf_counter()
        if mode == "deepspeed":
            engine.save_checkpoint(str(plain), tag=f"s{n}", save_latest=False)
            out["blocked_s"] = out["durable_s"] = time.perf_counter() - t0
        elif mode in ("blocking", "background"):
            ckpt.save(engine, state, {"position": n}, background=mode == "background")
            out["blocked_s"] = time.perf_counter() - t0
        out["step_s"] = []
        for _ in range(steps):
            t_step = time.perf_counter()
            train_step(engine, batch)
            if mode == "background":
                ckpt.poll()
            out["step_s"].append(time.perf_counter() - t_step)
        if mode == "background":
            t_wait = time.perf_counter()
            ckpt.wait()
            out["end_wait_s"] = time.perf_counter() - t_wait
        out["window_s"] = time.perf_counter() - t0
        if mode in ("blocking", "background"):
            out["durable_s"] = ckpt.save_seconds
            folder = ckpt.dir / step_name(n)
            out["bytes"] = folder_bytes(folder)
            shutil.rmtree(folder)
        elif mode == "deepspeed":
            out["bytes"] = folder_bytes(plain / f"s{n}")
            shutil.rmtree(plain / f"s{n}")
        return out

    modes = MODES
    rows = []
    for trial in range(trials):
        row = {}
        for mode in modes[trial % 3:] + modes[:trial % 3]:  # the order turns from trial to trial
            settle(cooldown)
            row[f"none-{mode}"] = window(None)
            row[mode] = w = window(mode)
            w["baseline_step_s"] = step = statistics.median(row[f"none-{mode}"]["step_s"])
            w["lost_s"] = w["blocked_s"] + sum(w["step_s"]) + w["end_wait_s"] - steps * step
        settle(cooldown)
        row["dd_MBps"] = dd(ctx.run_dir, row["background"]["bytes"])
        rows.append(row)
        print(f"{preset} trial {trial + 1}: " + ", ".join(
            f"{m} lost {row[m]['lost_s']:.2f}s (step {row[m]['baseline_step_s']:.2f}s, blocked "
            f"{row[m]['blocked_s']:.2f}s, durable after {row[m]['durable_s']:.2f}s)" for m in modes)
            + f"; dd {row['dd_MBps']:.0f} MB/s", flush=True)
    result = {"preset": preset, "precision": precision, "params": params, "steps_per_window": steps, "cooldown_s": cooldown, "trials": rows,
              "host_pool_bytes": ckpt._pool.allocated}
    result["summary"] = summarize(rows)
    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    return result


MODES = ("deepspeed", "blocking", "background")


def slowdown(w: dict) -> float:
    """The extra time of the window's steps that ran while the save was still being written (they start before
    `durable_s`), against the median of its steps that ran after it: steps next to each other, so other load on
    the machine mostly cancels. 0 for a save that blocked until durable (no step ran beside it)."""
    t, during, after = w["blocked_s"], [], []
    for x in w["step_s"]:
        (during if t < w["durable_s"] else after).append(x)
        t += x
    if not during:
        return 0.0
    ref = statistics.median(after) if len(after) >= 2 else w["baseline_step_s"]
    return sum(during) - len(during) * ref


def summarize(rows: list[dict]) -> dict:
    def spread(values) -> dict:
        values = list(values)
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    for r in rows:
        for mode in MODES:
            w = r[mode]
            w["slowdown_s"] = slowdown(w)
            w["lost_adjacent_s"] = w["blocked_s"] + w["slowdown_s"] + w["end_wait_s"]
    summary = {"step_s": spread(r[m]["baseline_step_s"] for r in rows for m in MODES),
               "dd_MBps": spread(r["dd_MBps"] for r in rows)}
    for mode in MODES:
        summary[mode] = {key: spread(r[mode][key] for r in rows)
                         for key in ("lost_s", "lost_adjacent_s", "slowdown_s", "blocked_s", "end_wait_s",
                                     "durable_s")}
        summary[mode]["MBps"] = spread(r[mode]["bytes"] / r[mode]["durable_s"] / 1e6 for r in rows)
        summary[mode]["over_dd"] = spread(r[mode]["bytes"] / r[mode]["durable_s"] / 1e6 / r["dd_MBps"] for r in rows)
        summary[mode]["bytes"] = rows[0][mode]["bytes"]
    for mode in ("blocking", "background"):
        for key in ("lost_s", "lost_adjacent_s", "blocked_s"):
            summary[mode][f"{key}_over_deepspeed"] = spread(r[mode][key] / r["deepspeed"][key] for r in rows)
    return summary


def show(r: dict) -> None:
    m, n = r["summary"], len(r["trials"])

    def med(x):
        return x["median"]

    bg = m["background"]
    print(f"{r['preset']}: {r['params'] / 1e6:.1f}M parameters, checkpoint {bg['bytes'] / 1e9:.2f} GB, step "
          f"{med(m['step_s']):.2f}s; medians of {n}: DeepSpeed save blocks {med(m['deepspeed']['blocked_s']):.2f}s; "
          f"background blocks {med(bg['blocked_s']):.2f}s ({med(bg['blocked_s_over_deepspeed']):.3f} of "
          f"DeepSpeed's), slows the steps beside its write by {med(bg['slowdown_s']):.2f}s, lost "
          f"{med(bg['lost_adjacent_s']):.2f}s ({med(bg['lost_adjacent_s_over_deepspeed']):.3f} of DeepSpeed's; "
          f"window against window: {med(bg['lost_s']):.2f}s vs {med(m['deepspeed']['lost_s']):.2f}s), durable "
          f"after {med(bg['durable_s']):.1f}s; write MB/s: blocking {med(m['blocking']['MBps']):.0f} "
          f"({med(m['blocking']['over_dd']):.2f} of dd), background {med(bg['MBps']):.0f} ({med(bg['over_dd']):.2f}), "
          f"DeepSpeed {med(m['deepspeed']['MBps']):.0f} ({med(m['deepspeed']['over_dd']):.2f}), dd "
          f"{med(m['dd_MBps']):.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["base", "large"], choices=["tiny", "base", "large"])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="training steps per window")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / ".bench-ckpt")
    p.add_argument("--out", type=Path, default=None, help="also write the report (JSON) here")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: bf16 weights, fp32 master copy and moments (14 bytes per parameter)")
    p.add_argument("--cooldown", type=float, default=30.0, help="seconds of quiet before each pair of windows")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training steps (default 1: the "
                   "host side of a GPU trainer is one thread; the trainer on a CPU takes every core)")
    p.add_argument("--summarize", type=Path, default=None, help="only print the summary of a saved report")
    args = p.parse_args()
    if args.summarize:
        for r in json.loads(args.summarize.read_text())["results"]:
            r["summary"] = summarize(r["trials"])
            show(r)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    THREADS[0] = args.threads
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "threads": args.threads, "load_before": os.getloadavg(),
              "disk": subprocess.run(["df", "-h", str(args.workdir)], capture_output=True, text=True,
                                     check=False).stdout.splitlines()[-1], "results": []}
    for preset in args.preset:
        r = bench(preset, args.trials, args.steps, args.workdir, args.cooldown, args.precision)
        report["results"].append(r)
        show(r)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
