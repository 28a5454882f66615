"""The bare DeepSpeed loop of bench/bench_overhead.py (under torchrun): `overhead_bare.py SPEC STEPS WARMUP`.

The same model (jobs.model.pretrain_model), data and masking (jobs.data.MLMBatcher) and DeepSpeed config as
jobs.train builds for SPEC; the loop is batch -> forward -> backward -> step and nothing else. Rank 0 prints
{"steps_per_s": ...} over the steps after WARMUP.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import deepspeed
    import torch

    from jobs import data as D
    from jobs.model import pretrain_model
    from launcher.loading import load_spec

    spec, steps, warm = load_spec(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    t = spec.train
    train = D.PackedDataset(D.resolve_prepared(spec.data.prepared), "train")
    model = pretrain_model(spec, train.index["vocab_size"], train.index["special_ids"])
    accum = t.global_batch_size // (t.micro_batch_size * world)
    config = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": accum, "gradient_clipping": t.grad_clip,
              "zero_optimization": {"stage": spec.distributed.zero_stage},
              "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                        "weight_decay": t.weight_decay, "torch_adam": True}},
              "bf16": {"enabled": t.precision == "bf16"}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batcher = D.MLMBatcher(train, t.micro_batch_size, rank, world, accum, t.seed, spec.data.mask_prob)
    engine.train()
    start = None
    for step in range(steps):
        if step == warm:
            start = time.perf_counter()
        for m in range(accum):
            loss = engine(**batcher.batch(step, m)).loss
            engine.backward(loss)
            engine.step()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"steps_per_s": (steps - warm) / elapsed}), flush=True)


if __name__ == "__main__":
    main()
