"""The baseline of bench/gpu.sh: the same ModernBERT, data and micro batch through the Hugging Face `Trainer`.

    python bench/gpu_hf_trainer.py --data RUN/data --preset base --vocab 50368 --micro-batch 32 --out FILE

What a user of the training guide runs: `ModernBertForMaskedLM` from the same config (SDPA attention, the
library's defaults otherwise), `DataCollatorForLanguageModeling` at the same 30% masking over the same packed
1024-token rows, `Trainer` with bf16 mixed precision and its default AdamW, dataloader workers and pinned
memory. Appends one JSON row to --out: tokens/s (median over logging intervals after the first, timed with a CUDA
synchronize at each interval's end), peak memory allocated, and the model's parameter count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import data as D  # noqa: E402
from jobs.model import build_config  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, packed: D.PackedDataset, length: int):
        self.packed, self.length = packed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        row = self.packed.rows([i % len(self.packed)])[0]
        return {"input_ids": torch.from_numpy(row)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="base")
    p.add_argument("--vocab", type=int, default=50368)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log", type=int, default=10)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from transformers import (DataCollatorForLanguageModeling, ModernBertForMaskedLM, Trainer, TrainerCallback,
                              TrainingArguments)

    folder = Path(args.data)
    packed = D.PackedDataset(folder, "train")
    tokenizer = D.load_tokenizer(folder / D.TOKENIZER_DIR)
    config = build_config(args.preset, {"vocab_size": args.vocab}, packed.index["vocab_size"],
                          packed.index["special_ids"], packed.seq_len)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM._from_config(config, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    cuda = torch.cuda.is_available()
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step % args.log == 0:
                if cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
            learning_rate=8e-4, weight_decay=1e-5, adam_beta2=0.98, adam_epsilon=1e-6, max_grad_norm=1.0,
            bf16=args.precision == "bf16" and cuda, logging_steps=args.log, save_strategy="no", report_to="none",
            dataloader_num_workers=4 if cuda else 0, dataloader_pin_memory=cuda, disable_tqdm=True, seed=0,
            use_cpu=not cuda)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
        trainer = Trainer(model=model, args=targs, train_dataset=Rows(packed, args.steps * args.micro_batch * 2),
                          data_collator=collator, callbacks=[Clock()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    tokens_per_interval = args.log * args.micro_batch * packed.seq_len
    rates = [tokens_per_interval / (b - a) for a, b in zip(marks, marks[1:])]
    row = {"row": f"hf-trainer-mb{args.micro_batch}", "runner": "hf", "micro_batch": args.micro_batch,
           "tokens_per_step_per_gpu": args.micro_batch * packed.seq_len, "parameters": params,
           "tokens_per_s_per_gpu": round(statistics.median(rates)) if rates else None, "intervals": len(rates),
           "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if cuda else None,
           "loss_last": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}
    print("[gpu-bench]", json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
