"""kind: pretrain — packed shards -> ModernBertForPreTraining (MLM, optional SOP) under DeepSpeed.

Data: data.prepared, or data.train prepared by rank 0 into <run_dir>/data (reused when complete).
Held-out MLM loss is measured before the first step and at every evaluation on the same masked rows, so
the numbers are comparable over the run. The end: final/ holds a plain ModernBertForMaskedLM + tokenizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from jobs import data as D
from jobs.evaluate import perplexity
from jobs.loop import Loop
from jobs.model import export_mlm, pretrain_model
from jobs.device import to_device
from jobs.runtime import Context, accumulation, build_engine, finish, full_state_dict, parameter_count
from launcher import contract


def data_folder(ctx: Context):
    spec = ctx.spec
    if spec.data.prepared:
        return ctx.on_rank0(lambda: D.resolve_prepared(spec.data.prepared))
    out = ctx.run_dir / contract.DATA_DIR

    def prep():
        if D.is_prepared(out):
            ctx.log(f"reusing prepared data in {out}")
        else:
            D.prepare(spec, out, ctx.log)
        return out

    return ctx.on_rank0(prep)  # the others wait in the broadcast: a barrier


@torch.no_grad()
def heldout_loss(engine, batcher: D.MLMBatcher, batches: int) -> float:
    """Mean MLM loss over masked tokens of the same held-out rows and masks every time. The sums stay on the
    engine's device (the all_reduce needs them there under NCCL) and are read once, at the end."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss x masked tokens, masked tokens
    for i in range(batches):
        batch = batcher.batch(0, i)
        batch.pop("sop_labels", None)
        n = int((batch["labels"] != -100).sum())  # counted on the host, before the copy
        out = engine(**to_device(batch, engine.device))
        total[0] += out.loss.double() * n
        total[1] += n
    engine.train()
    dist.all_reduce(total)
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1)


def run_pretrain(ctx: Context) -> int:
    spec = ctx.spec
    folder = data_folder(ctx)
    train = D.PackedDataset(folder, "train")
    held = D.PackedDataset(folder, "heldout")
    ix = train.index
    if ix["seq_len"] != spec.data.seq_len:
        ctx.log(f"note: prepared data has seq_len {ix['seq_len']} (spec says {spec.data.seq_len}); using the data's")
    tokenizer = D.load_tokenizer(folder / D.TOKENIZER_DIR)
    model = pretrain_model(spec, ix["vocab_size"], ix["special_ids"])
    accum = accumulation(ctx)
    total = spec.train.max_steps
    engine = build_engine(ctx, model, total, accum)
    sop = spec.data.objective == "mlm+sop"
    batcher = D.MLMBatcher(train, spec.train.micro_batch_size, ctx.rank, ctx.world, accum, spec.train.seed,
                           spec.data.mask_prob, sop=sop)
    held_batcher = D.MLMBatcher(held, spec.train.micro_batch_size, ctx.rank, ctx.world, 1, spec.train.seed + 1,
                                spec.data.mask_prob, sop=False, shuffle=False)
    loop = Loop(ctx, engine, total, accum, batcher.batch, batcher.global_batch * ix["seq_len"], greater_is_better=False)
    loop.batch_position = batcher.position
    params = parameter_count(engine.module)
    weights = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    ctx.log(f"pretrain: {params / 1e6:.2f}M parameters, {len(train)} train / {len(held)} held-out sequences, "
            f"{ctx.world} ranks x micro {spec.train.micro_batch_size} x accum {accum}, ZeRO {spec.distributed.zero_stage}, "
            f"{spec.train.precision} (weights {weights} on {engine.device}), {total} steps")

    def evaluate(step: int):
        loss = heldout_loss(engine, held_batcher, spec.train.eval_batches)
        loop.state["metric"] = loss
        if loop.improved(loss):
            loop.state["best_metric"], loop.state["best_step"] = loss, step
        ctx.record({"step": step, "split": "heldout", "loss": loss, "perplexity": perplexity(loss)})
        ctx.log(f"step {step}: held-out MLM loss {loss:.4f} (perplexity {perplexity(loss):.2f})")

    if not loop.resume():
        evaluate(0)
        loop.state["extra"]["heldout_loss_start"] = loop.state["metric"]
    eval_every = spec.train.eval_every_steps or spec.checkpoint.every_steps

    def evaluate_then_continue(step: int):
        evaluate(step)

    code = loop.run(evaluate_then_continue, eval_every)
    if code:
        return code
    evaluate(loop.state["step"])
    state = full_state_dict(engine, spec.distributed.zero_stage)
    final = ctx.run_dir / contract.FINAL_DIR
    if ctx.rank == 0:
        tmp = ctx.run_dir / (contract.FINAL_DIR + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        export_mlm(state, engine.module.config, tmp)
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    summary = {"kind": "pretrain", "final_dir": str(final), "steps": loop.state["step"], "tokens": loop.state["tokens"],
               "heldout_loss_start": loop.state["extra"].get("heldout_loss_start"), "heldout_loss": loop.state["metric"],
               "perplexity": perplexity(loop.state["metric"]), "tokens_per_s": loop.tokens_per_s}
    if spec.export.onnx and ctx.rank == 0:
        from jobs.export import export_onnx

        summary["onnx"] = export_onnx(ctx.run_dir, quantize=spec.export.quantize == "int8")
    finish(ctx, summary)
    return 0
