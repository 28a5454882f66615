"""Resume cost against the data position, and checkpoint write throughput against `dd` on the same disk.

    python bench/bench_resume.py [resume] [write] [--trials 3] [--preset base] [--workdir runs/.bench-resume]

resume: the tiny model, 2 ranks under torchrun, packed data of 1,100,000 sequences (the synthetic corpus's
real packed rows, drawn again until there are that many). A real run trains to step 10 and saves. A second
checkpoint is that same checkpoint with its trainer state and per-rank data positions moved to step 31250,
where rank 0 reads sample 1,000,000 (so the model and optimizer bytes are identical and only the data
position differs). Each trial copies the run directory afresh and times a whole `torchrun` from process start
to the metrics row of the first resumed step; the two positions alternate. Also: one batch at each position
from a fresh batcher in this process (the seek alone).

write: a model of `--preset` (ZeRO-1, fp32, AdamW: 16 bytes per parameter), 2 ranks under torchrun; each
trial takes one training step, then times Checkpointer.save (every rank's files hashed and fsynced while
written, manifest, marker, rename, `latest`) and, for reference, DeepSpeed's engine.save_checkpoint alone
(no fsync, no hashes). Then `dd if=/dev/zero bs=1M conv=fsync` of the same size into the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = 1_100_000
FAR_STEP = 31_250  # x global batch 32 = sample 1,000,000
GLOBAL, MICRO = 32, 16


def tiny_spec(run_dir: Path, prepared: Path, *sets: str):
    from launcher.loading import load_spec

    return load_spec(REPO / "examples/pretrain-tiny.yaml", sets=[
        f"checkpoint.dir={run_dir}", f"data.prepared={prepared}", f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={MICRO}", "train.log_every_steps=1", "train.eval_batches=1",
        "train.eval_every_steps=100000", "train.warmup_steps=0", "checkpoint.every_steps=10", *sets]).resolved(REPO)


def write_spec(spec, run_dir: Path) -> Path:
    from launcher import contract

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / contract.SPEC_FILE
    path.write_text(spec.to_yaml())
    return path


def torchrun_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", *args]


def kill_tree(pid: int) -> None:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- resume ---------------------------------------------------------------------------------------


def big_data(work: Path) -> Path:
    """Packed data of ROWS train sequences: the tiny corpus prepared, its train rows drawn again to ROWS."""
    import numpy as np

    from jobs import data as D

    out = work / "data"
    if D.is_prepared(out) and json.loads((out / D.INDEX_FILE).read_text())["splits"]["train"]["sequences"] == ROWS:
        return out
    if out.exists():
        shutil.rmtree(out)
    spec = tiny_spec(work / "prep", out)
    index = D.prepare(spec, out, log=lambda m: None)
    real = D.PackedDataset(out, "train").rows(np.arange(index["splits"]["train"]["sequences"])).astype(index["dtype"])
    for old in out.glob("train-*.bin"):
        old.unlink()
    rows = real[np.random.default_rng(0).integers(0, len(real), ROWS)]
    index["splits"]["train"] = D._write_split(out, "train", rows)
    (out / D.INDEX_FILE).write_text(json.dumps(index, indent=1))
    return out


def prepare_resume(work: Path) -> tuple[Path, Path]:
    """Two run directories: latest = step 10 (trained), latest = step FAR_STEP (same weights, data moved)."""
    import torch

    from jobs import data as D
    from jobs.checkpoint import MANIFEST_FILE, STATE_FILE, step_name
    from launcher import contract

    data = big_data(work)
    near, far = work / "near", work / "far"
    if (near / contract.LATEST_FILE).exists() and (far / contract.LATEST_FILE).exists():
        return near, far
    for d in (near, far):
        if d.exists():
            shutil.rmtree(d)
    spec = write_spec(tiny_spec(near, data, "train.max_steps=11"), near)
    proc = subprocess.run(torchrun_cmd("-m", "jobs.train", "--spec", str(spec)), cwd=REPO, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    for name in (contract.DONE_FILE, contract.SUMMARY_FILE, contract.METRICS_FILE):
        (near / name).unlink()
    shutil.rmtree(near / contract.FINAL_DIR)
    assert (near / contract.LATEST_FILE).read_text().strip() == "checkpoints/step-00000010"

    shutil.copytree(near, far)
    src = far / "checkpoints" / step_name(10)
    dst = src.with_name(step_name(FAR_STEP))
    src.rename(dst)
    state = json.loads((dst / STATE_FILE).read_text())
    state["tokens"] = state["tokens"] // 10 * FAR_STEP
    state["step"] = FAR_STEP
    (dst / STATE_FILE).write_text(json.dumps(state, indent=1))
    dataset = D.PackedDataset(data, "train")
    for rank in (0, 1):
        path = dst / f"rank-{rank:05d}.pt"
        rank_state = torch.load(path, weights_only=False)
        batcher = D.MLMBatcher(dataset, MICRO, rank, 2, 1, 0, 0.3)
        rank_state["position"] = batcher.position(FAR_STEP)
        torch.save(rank_state, path)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest["step"] = FAR_STEP
    for rel in manifest["files"]:
        manifest["files"][rel] = {"bytes": (dst / rel).stat().st_size, "sha256": D.file_sha256(dst / rel)}
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    (far / contract.LATEST_FILE).write_text(f"checkpoints/{dst.name}\n")
    return near, far


def time_resume(template: Path, trial: Path, step: int) -> float:
    """Seconds from starting torchrun to the metrics row of step + 1 (the first resumed step)."""
    from launcher import contract

    if trial.exists():
        shutil.rmtree(trial)
    shutil.copytree(template, trial)
    data = template.parent / "data"
    spec = write_spec(tiny_spec(trial, data, f"train.max_steps={step + 5}"), trial)
    metrics = trial / contract.METRICS_FILE
    t0 = time.time()
    proc = subprocess.Popen(torchrun_cmd("-m", "jobs.train", "--spec", str(spec)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while time.time() - t0 < 300:
            if metrics.exists():
                for line in metrics.read_text().splitlines():
                    row = json.loads(line)
                    if row.get("step") == step + 1 and "split" not in row:
                        return row["time"] - t0
            if proc.poll() is not None:
                raise SystemExit(f"the job ended before step {step + 1}: {proc.stdout.read()[-3000:]}")
            time.sleep(0.02)
        raise SystemExit("no resumed step in 300 s")
    finally:
        kill_tree(proc.pid)
        proc.wait()


def seek_cost(data: Path) -> dict:
    """One micro batch at each position from a fresh batcher (the permutation of the epoch included)."""
    from jobs import data as D

    out = {}
    for step in (10, FAR_STEP):
        times = []
        for _ in range(5):
            batcher = D.MLMBatcher(D.PackedDataset(data, "train"), MICRO, 0, 2, 1, 0, 0.3)
            t0 = time.perf_counter()
            batcher.batch(step, 0)
            times.append(time.perf_counter() - t0)
        out[step] = {"median_s": statistics.median(times), "next_sample": batcher.position(step)["next_sample"]}
    return out


def bench_resume(work: Path, trials: int) -> dict:
    near, far = prepare_resume(work)
    results: dict[str, list[float]] = {"10": [], str(FAR_STEP): []}
    time_resume(near, work / "trial", 10)  # warm-up: page cache, compiled ops
    for _ in range(trials):
        results["10"].append(time_resume(near, work / "trial", 10))
        results[str(FAR_STEP)].append(time_resume(far, work / "trial", FAR_STEP))
    shutil.rmtree(work / "trial")
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"seconds": results, "median": med, "ratio_far_over_near": med[str(FAR_STEP)] / med["10"],
            "seek": seek_cost(work / "data"), "rows": ROWS, "far_sample": FAR_STEP * GLOBAL}


# ---- write throughput -----------------------------------------------------------------------------


def save_worker(spec_path: str, saves: int, out: str) -> None:
    """Under torchrun: one step, then Checkpointer.save and DeepSpeed's save alone, `saves` times."""
    import torch
    import torch.distributed as dist

    from jobs import data as D
    from jobs.checkpoint import MANIFEST_FILE, Checkpointer
    from jobs.model import pretrain_model
    from jobs.train import Context, accumulation, build_engine
    from launcher.loading import load_spec

    spec = load_spec(spec_path)
    ctx = Context(spec)
    data = D.PackedDataset(Path(spec.data.prepared), "train")
    ix = data.index
    model = pretrain_model(spec, ix["vocab_size"], ix["special_ids"])
    accum = accumulation(ctx)
    engine = build_engine(ctx, model, spec.train.max_steps, accum)
    batcher = D.MLMBatcher(data, spec.train.micro_batch_size, ctx.rank, ctx.world, accum, 0, 0.3)
    ckpt = Checkpointer(ctx.run_dir, spec, ctx.rank, ctx.world, log=ctx.log)
    plain = ctx.run_dir / "plain"
    rows = []
    for step in range(1, saves + 1):
        out_ = engine(**batcher.batch(step, 0))
        engine.backward(out_.loss)
        engine.step()
        state = {"step": step, "tokens": 0, "metric": None, "best_metric": None, "best_step": None,
                 "fingerprint": spec.training_fingerprint(), "world_size": ctx.world, "kind": "pretrain"}
        dist.barrier()
        t0 = time.perf_counter()
        folder = ckpt.save(engine, state, {"position": batcher.position(step)})
        t_save = time.perf_counter() - t0
        dist.barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(str(plain), tag=f"s{step}", save_latest=False)
        t_plain = time.perf_counter() - t0
        if ctx.rank == 0:
            files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
            rows.append({"step": step, "bytes": sum(f["bytes"] for f in files.values()), "save_s": t_save,
                         "deepspeed_only_s": t_plain})
            shutil.rmtree(plain / f"s{step}")
        dist.barrier()
    if ctx.rank == 0:
        params = sum(p.numel() for p in engine.module.parameters())
        Path(out).write_text(json.dumps({"params": params, "saves": rows}))
    dist.barrier()
    torch.distributed.destroy_process_group()


def dd(folder: Path, megabytes: int) -> float:
    target = folder / "dd.bin"
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                          capture_output=True, text=True, check=True)
    target.unlink()
    match = re.search(r"copied, ([0-9.]+) s", proc.stderr)
    return megabytes * 2 ** 20 / float(match.group(1)) / 1e6


def bench_write(work: Path, preset: str, saves: int) -> dict:
    data = big_data(work) if (work / "data").exists() else None
    if data is None:  # the write bench alone needs only some packed data
        from jobs import data as D

        data = work / "small-data"
        if not D.is_prepared(data):
            D.prepare(tiny_spec(work / "prep", data), data, log=lambda m: None)
    run = work / "write"
    if run.exists():
        shutil.rmtree(run)
    spec = write_spec(tiny_spec(run, data, f"model.preset={preset}", "train.global_batch_size=2",
                                "train.micro_batch_size=1", f"train.max_steps={saves + 1}",
                                "checkpoint.every_steps=1", f"checkpoint.keep_last={saves + 1}"), run)
    out = work / "write.json"
    proc = subprocess.run(torchrun_cmd(str(Path(__file__).resolve()), "_save-worker", str(spec), str(saves),
                                       str(out)), cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    result = json.loads(out.read_text())
    shutil.rmtree(run)
    size = result["saves"][0]["bytes"]
    result["dd_MBps"] = [dd(work, max(1, round(size / 2 ** 20))) for _ in range(saves)]
    result["save_MBps"] = [r["bytes"] / r["save_s"] / 1e6 for r in result["saves"]]
    result["deepspeed_only_MBps"] = [r["bytes"] / r["deepspeed_only_s"] / 1e6 for r in result["saves"]]
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_save-worker":
        save_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="*", help="resume, write, or both (the default)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / ".bench-resume")
    args = p.parse_args()
    args.what = args.what or ["resume", "write"]
    if set(args.what) - {"resume", "write"}:
        p.error(f"unknown benchmark(s) {sorted(set(args.what) - {'resume', 'write'})}; choose resume and/or write")
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "disk": subprocess.run(
        ["df", "-h", str(args.workdir)], capture_output=True, text=True, check=False).stdout.splitlines()[-1]}}
    if "resume" in args.what:
        report["resume"] = r = bench_resume(args.workdir, args.trials)
        print(f"start -> first resumed step, median of {args.trials}: step 10 {r['median']['10']:.2f} s, "
              f"step {FAR_STEP} (sample {r['far_sample']:,} of {ROWS:,}) {r['median'][str(FAR_STEP)]:.2f} s, "
              f"ratio {r['ratio_far_over_near']:.3f}")
        print("seek alone: " + ", ".join(f"step {k}: {v['median_s'] * 1e3:.1f} ms (sample {v['next_sample']:,})"
                                         for k, v in r["seek"].items()))
    if "write" in args.what:
        report["write"] = w = bench_write(args.workdir, args.preset, args.trials)
        gb = w["saves"][0]["bytes"] / 1e9
        print(f"checkpoint of {w['params'] / 1e6:.1f}M parameters ({args.preset}): {gb:.2f} GB; "
              f"Checkpointer.save {statistics.median(w['save_MBps']):.0f} MB/s, DeepSpeed save alone "
              f"{statistics.median(w['deepspeed_only_MBps']):.0f} MB/s, dd conv=fsync "
              f"{statistics.median(w['dd_MBps']):.0f} MB/s (medians of {args.trials})")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
