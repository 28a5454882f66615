"""Masked tokens/s of jobs.data's vectorized MLM batcher vs Hugging Face's DataCollatorForLanguageModeling.

    python bench/bench_loader.py [--batch 64] [--seq-len 1024] [--iters 20]

Both mask the same packed rows (30% MLM, 80/10/10). Ours: one torch pass over the whole batch
(jobs.data.mask_tokens). HF: the collator's per-call path (tensor in -> special-token mask -> masking).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import data as D  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    texts = (repo / "examples/data/corpus.txt").read_text().splitlines()[:2000]
    tok = D.train_tokenizer(texts, 1024, args.seq_len)
    vocab = len(tok)
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(5, vocab, size=(args.batch, args.seq_len)))
    special = torch.zeros(vocab, dtype=torch.bool)
    special[[tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id, tok.mask_token_id]] = True
    samples = np.arange(args.batch, dtype=np.int64)

    def ours():  # the batcher's masking: its uniforms hashed from (seed, sample, position), then the masks
        r, pick = D.sample_uniforms(0, samples, args.seq_len, 0, pair=True)
        return D.mask_tokens(rows, r, pick, 0.3, tok.mask_token_id, vocab, special)

    from transformers import DataCollatorForLanguageModeling

    hf = DataCollatorForLanguageModeling(tok, mlm_probability=0.3, return_tensors="pt")
    examples = [{"input_ids": r} for r in rows]

    def theirs():
        return hf(examples)

    results = {}
    for name, fn in (("mbl", ours), ("hf_collator", theirs)):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        dt = time.perf_counter() - t0
        results[name] = args.iters * rows.numel() / dt
    line = {"batch": args.batch, "seq_len": args.seq_len, "threads": 1,
            "mbl_tokens_per_s": round(results["mbl"]), "hf_collator_tokens_per_s": round(results["hf_collator"]),
            "speedup": round(results["mbl"] / results["hf_collator"], 1)}
    prepared = repo / "runs/tiny-pretrain/data"  # the full path: seek + memmap read + mask, if prepared
    if D.is_prepared(prepared):
        ds = D.PackedDataset(prepared, "train")
        b = D.MLMBatcher(ds, 512, 0, 1, 1, 0, 0.3)
        b.batch(0, 0)
        t0 = time.perf_counter()
        for step in range(args.iters):
            b.batch(step, 0)
        line["mbl_batcher_end_to_end_tokens_per_s"] = round(args.iters * 512 * ds.seq_len / (time.perf_counter() - t0))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
