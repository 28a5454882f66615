"""The table of a bench/gpu.sh results file: `python bench/gpu_report.py FILE.jsonl` (markdown, for bench/README).

Each row's tokens/s per GPU is also shown as a ratio to the Hugging Face Trainer row of the same run and to the
ModernBERT paper's ~312k tokens/s per H100 (1.719 T tokens in 1,529 GPU-hours).
"""

from __future__ import annotations

import json
import os
import sys

PAPER_TOKENS_PER_S = 1.719e12 / (1529 * 3600)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    head = next((r for r in rows if r.get("row") == "header"), {})
    body = [r for r in rows if r.get("row") != "header"]
    hf_rows = {r["micro_batch"]: r.get("tokens_per_s_per_gpu") for r in body if r.get("runner") == "hf"}
    peak = float(os.environ.get("MBL_PEAK_TFLOPS", 989.0)) * 1e12
    params = next((r["parameters"] for r in body if r.get("parameters")), None)
    print(f"{head.get('device', '?')} x {head.get('gpus', '?')}, {head.get('preset', '?')} at {head.get('seq_len')} "
          f"tokens; torch {head.get('torch')} (CUDA {head.get('cuda')}), deepspeed {head.get('deepspeed')}, "
          f"transformers {head.get('transformers')}, flash-attn {head.get('flash_attn')}; {head.get('date')}")
    print()
    print("| row | micro batch | tokens/s per GPU | vs HF Trainer (same micro batch) | vs 312k | MFU | peak GiB | loader share | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in body:
        tps = r.get("tokens_per_s_per_gpu")
        hf = hf_rows.get(r.get("micro_batch")) or next(iter(hf_rows.values()), None)  # same micro batch if run
        mfu = r.get("mfu")
        if mfu is None and tps and params:
            mfu = 6 * params * tps / peak
        cells = [r["row"], r.get("micro_batch", ""),
                 f"{tps:,}" if tps else "-",
                 f"{tps / hf:.2f}" if tps and hf else "-",
                 f"{tps / PAPER_TOKENS_PER_S:.2f}" if tps else "-",
                 f"{mfu:.3f}" if mfu else "-",
                 r.get("max_memory_gib") or "-",
                 f"{r['data_share']:.3f}" if r.get("data_share") is not None else "-",
                 r.get("skipped") or (f"exit {r['exit']}" if r.get("exit") else "")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
