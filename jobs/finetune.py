"""kind: finetune — classification, token classification (NER) or extractive QA from a pre-trained model.

model.init_from is a pre-training run directory (its final/) or a Hugging Face folder; the tokenizer comes
from that folder. Evaluation every epoch (or train.eval_every_steps); the best model by task.metric is
kept in <run_dir>/best/ and becomes final/; optional early stopping; test metrics at the end, next to a
trivial baseline's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch.distributed as dist

from jobs import data as D
from jobs import devicecheck
from jobs.loop import Loop
from jobs.model import TASK_CLASSES, resolve_init, task_model
from jobs.runtime import Context, accumulation, build_engine, finish, full_state_dict
from jobs.tasks import Task, load_rows
from launcher import contract

BEST_DIR = "best"  # the best model so far, a Hugging Face folder


def load_splits(ctx: Context) -> dict:
    d, cache = ctx.spec.data, ctx.run_dir / ".hf-cache"
    named = {"train": d.train, "validation": d.validation, "test": d.test}

    def load():
        return {k: load_rows(v, cache) for k, v in named.items() if v}

    ctx.on_rank0(lambda: (load(), None)[1])  # rank 0 fills the datasets cache; the others wait, then read it
    return load()


def save_model_folder(model_cls, config, state: dict, tokenizer, out: Path) -> None:
    """Write a Hugging Face folder atomically: tmp folder, then rename over the old one."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = model_cls(config)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def run_finetune(ctx: Context) -> int:
    spec = ctx.spec
    init = ctx.on_rank0(lambda: resolve_init(spec.model.init_from))
    tokenizer = D.load_tokenizer(init)
    task = Task(spec, tokenizer, load_splits(ctx))
    model_cls = TASK_CLASSES[spec.task.type]
    id2label = dict(enumerate(task.labels)) if task.labels else {0: "start", 1: "end"}
    model = task_model(spec, init, max(1, len(task.labels)) if task.labels else 2, id2label)
    accum = accumulation(ctx)
    t = spec.train
    train_feats = task.features["train"]
    steps_per_epoch = max(1, len(train_feats) // t.global_batch_size)
    total = t.epochs * steps_per_epoch if t.epochs else t.max_steps
    eval_every = t.eval_every_steps or steps_per_epoch
    engine = build_engine(ctx, model, total, accum)
    order = D.SampleOrder(len(train_feats), t.seed)

    def batch(step: int, micro_idx: int):
        start = step * t.global_batch_size + (micro_idx * ctx.world + ctx.rank) * t.micro_batch_size
        rows = order(np.arange(start, start + t.micro_batch_size, dtype=np.int64))
        return task.collate([train_feats[i] for i in rows])

    metric = spec.task.best_metric
    greater = spec.task.greater_is_better if spec.task.greater_is_better is not None else metric != "loss"
    tokens = int(np.mean([len(f["input_ids"]) for f in train_feats]) * t.global_batch_size)
    loop = Loop(ctx, engine, total, accum, batch, tokens, greater_is_better=greater)
    eval_split = "validation" if "validation" in task.features else "train"
    ctx.log(f"finetune {spec.task.type}: {len(train_feats)} train features, labels {task.labels or 'start/end'}, "
            f"{total} steps ({steps_per_epoch}/epoch), evaluating on {eval_split} every {eval_every} steps by {metric}")
    best_dir = ctx.run_dir / BEST_DIR

    def evaluate(step: int):
        m = task.evaluate(engine, eval_split, t.micro_batch_size, ctx.rank, ctx.world, engine.device)
        value = m[metric]
        loop.state["metric"] = value
        ctx.record({"step": step, "split": eval_split, **m})
        ctx.log(f"step {step}: {eval_split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        state = full_state_dict(engine, spec.distributed.zero_stage)
        if loop.improved(value):
            loop.state.update(best_metric=value, best_step=step, bad_evals=0)
            if ctx.rank == 0:
                save_model_folder(model_cls, engine.module.config, state, tokenizer, best_dir)
        else:
            loop.state["bad_evals"] += 1
        dist.barrier()
        patience = spec.task.early_stopping_patience
        return "stop" if patience and loop.state["bad_evals"] >= patience else None

    loop.resume()
    code = loop.run(evaluate, eval_every)
    if code:
        return code
    if loop.state["best_step"] != loop.state["step"]:
        evaluate(loop.state["step"])
    final = ctx.run_dir / contract.FINAL_DIR
    if ctx.rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(best_dir, tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    summary = {"kind": "finetune", "task": spec.task.type, "final_dir": str(final), "steps": loop.state["step"],
               "best_step": loop.state["best_step"], f"best_{eval_split}_{metric}": loop.state["best_metric"],
               "tokens_per_s": loop.tokens_per_s}
    pre = Path(spec.model.init_from) / contract.SUMMARY_FILE
    if pre.exists():  # the main job: pre-training then this fine-tune; report both in one place
        pre_summary = json.loads(pre.read_text())
        summary["pretrain"] = {k: pre_summary.get(k) for k in ("heldout_loss", "perplexity", "final_dir", "wall_seconds")}
    if "test" in task.features:
        best = model_cls.from_pretrained(str(final)).to(ctx.device)
        devicecheck.watch(best, ctx.device)
        summary["test"] = task.evaluate(best, "test", t.micro_batch_size, ctx.rank, ctx.world, ctx.device)
        summary["test_baseline"] = task.baseline("test")
        ctx.record({"step": loop.state["step"], "split": "test", **summary["test"]})
        ctx.log("test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items()) + "; trivial baseline: "
                + ", ".join(f"{k} {v:.4f}" for k, v in summary["test_baseline"].items()))
    if spec.export.onnx and ctx.rank == 0:
        from jobs.export import export_onnx

        summary["onnx"] = export_onnx(ctx.run_dir, quantize=spec.export.quantize == "int8")
    finish(ctx, summary)
    return 0
