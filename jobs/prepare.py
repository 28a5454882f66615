"""kind: prepare — rank 0 tokenizes the corpus and packs it into <run_dir>/data (see jobs/data.py); the other
ranks wait for it."""

from __future__ import annotations

from jobs import data
from jobs.runtime import Context, finish
from launcher import contract


def run_prepare(ctx: Context) -> int:
    out = ctx.run_dir / contract.DATA_DIR
    index = ctx.on_rank0(lambda: data.prepare(ctx.spec, out, ctx.log))
    finish(ctx, {"kind": "prepare", "data_dir": str(out), "train_sequences": index["splits"]["train"]["sequences"],
                 "heldout_sequences": index["splits"]["heldout"]["sequences"], "dtype": index["dtype"],
                 "vocab_size": index["vocab_size"]})
    return 0
