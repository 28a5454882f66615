"""Data preparation: tokenizing and packing with jobs.data against `datasets.map`, the same fast tokenizer.

    python bench/bench_prepare.py [--copies 10] [--procs 1 2 N] [--runs 3]

Corpus: examples/data/corpus.txt repeated --copies times (documents renumbered so no two are the same string).
The tokenizer is trained once (jobs.data.train_tokenizer, vocab 8192) and saved; each measured run is a fresh
process that loads it and turns every document into packed 1024-token rows:

- mbl: `jobs.data._pack` (the tokenizers library's `encode_batch`, whose Rust thread pool jobs.data sizes to
  the CPUs the job was given), with P threads;
- datasets.map: `Dataset.from_dict({"text": docs}).map(tokenize, batched=True, num_proc=P)` with the same
  tokenizer (`PreTrainedTokenizerFast.__call__`), then the same concatenate-and-cut packing, the way the
  Hugging Face examples (run_mlm.py's group_texts) do it; datasets' cache is off (in-memory), as for one pass.

Reports documents/s and tokens/s, median of --runs, and each as a ratio to datasets.map with the same P.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from jobs import data as D
kind, procs, tok_dir, corpus = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
docs = open(corpus).read().splitlines()
tok = D.load_tokenizer(tok_dir)
t0 = time.perf_counter()
if kind == "mbl":
    rows = D._pack(tok, docs, 1024, np.dtype(np.uint16))
else:
    import datasets
    datasets.disable_caching()
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ids = ds.map(lambda b: {"ids": [[cls, *x, sep] for x in tok(b["text"], add_special_tokens=False)["input_ids"]]},
                 batched=True, num_proc=procs if procs > 1 else None, remove_columns=["text"])
    stream = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids["ids"]])
    n = len(stream) // 1024
    rows = stream[: n * 1024].reshape(n, 1024)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "docs": len(docs), "tokens": int(rows.size)}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--procs", type=int, nargs="+", default=sorted({1, 2, len(os.sched_getaffinity(0))}))
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    from jobs import data as D

    with tempfile.TemporaryDirectory() as tmp:
        base = (REPO / "examples/data/corpus.txt").read_text().splitlines()
        docs = [f"{line} ({c})" for c in range(args.copies) for line in base]
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(docs) + "\n")
        tok_dir = Path(tmp) / "tok"
        D.train_tokenizer(base, 8192, 1024).save_pretrained(str(tok_dir))
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.runs):
            for procs in args.procs:
                for kind in ("mbl", "datasets.map"):
                    env = {**os.environ, "RAYON_NUM_THREADS": str(procs), "RAYON_RS_NUM_CPUS": str(procs),
                           "TOKENIZERS_PARALLELISM": "true" if kind == "mbl" else "false"}
                    out = subprocess.run([sys.executable, "-c", WORKER, str(REPO), kind, str(procs), str(tok_dir),
                                          str(corpus)], env=env, capture_output=True, text=True, check=True)
                    results.setdefault((kind, procs), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{len(docs)} documents, {args.runs} runs each, {os.cpu_count()} CPUs here")
    print("| path | threads / processes | documents/s | tokens/s | vs datasets.map |")
    print("|---|---|---|---|---|")
    for procs in args.procs:
        rate = {}
        for kind in ("mbl", "datasets.map"):
            runs = results[(kind, procs)]
            sec = statistics.median(r["seconds"] for r in runs)
            rate[kind] = (runs[0]["docs"] / sec, runs[0]["tokens"] / sec)
        for kind in ("mbl", "datasets.map"):
            d, t = rate[kind]
            print(f"| {kind} | {procs} | {d:,.0f} | {t / 1e6:.2f} M | {t / rate['datasets.map'][1]:.2f} |")


if __name__ == "__main__":
    main()
