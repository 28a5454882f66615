"""Export a finished run: ONNX (checked against PyTorch with onnxruntime) and dynamic int8 quantization.

    python -m jobs.export RUN_DIR --onnx [--quantize int8] [--tolerance 1e-4]

Writes <run_dir>/final/onnx/model.onnx (and model.int8.onnx) and <run_dir>/final/onnx/report.json: the
largest absolute logit difference between ONNX and PyTorch in fp32 (fails above the tolerance), and for
int8 the change of the run's metric (pre-training: held-out masked-token loss and accuracy; fine-tuning:
the test metric) and how often int8 picks the same top-1 as fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from jobs.errors import DataError, ExportError
from launcher import contract
from launcher.errors import MblError

TOLERANCE = 1e-4
OPSET = 17


class _Logits(torch.nn.Module):
    """Plain tensors in and out, so the exporter sees (input_ids, attention_mask) -> logits."""

    def __init__(self, model, qa: bool):
        super().__init__()
        self.model, self.qa = model, qa

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return (out.start_logits, out.end_logits) if self.qa else out.logits


def _load(final: Path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from jobs.model import TASK_CLASSES

    config = AutoConfig.from_pretrained(str(final))
    arch = (config.architectures or ["ModernBertForMaskedLM"])[0]
    classes = {c.__name__: c for c in TASK_CLASSES.values()}
    cls = classes.get(arch, AutoModelForMaskedLM)
    return cls.from_pretrained(str(final)).eval(), arch == "ModernBertForQuestionAnswering"


def _run(session, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})


def _eval_inputs(run_dir: Path, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Check inputs longer than the sliding window, with padding in one row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(3, 150))
    mask = np.ones_like(ids)
    mask[1, 100:] = 0
    return ids, mask


def _metric_inputs(run_dir: Path, spec):
    """(batches of (ids, mask), scorer(outputs per batch) -> metrics) for the run's own metric."""
    if spec.kind == "pretrain":
        from jobs import data as D

        folder = Path(spec.data.prepared) if spec.data.prepared else run_dir / contract.DATA_DIR
        folder = D.resolve_prepared(folder)
        held = D.PackedDataset(folder, "heldout")
        batcher = D.MLMBatcher(held, 8, 0, 1, 1, spec.train.seed + 1, spec.data.mask_prob, shuffle=False)
        batches = [batcher.batch(0, i) for i in range(min(4, max(1, len(held) // 8)))]
        inputs = [(b["input_ids"].numpy(), b["attention_mask"].numpy()) for b in batches]

        def score(outputs):
            loss_sum = correct = n = 0.0
            for b, (logits,) in zip(batches, outputs):
                labels = b["labels"].numpy()
                sel = labels != -100
                lg = logits[sel].astype(np.float64)
                lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
                loss_sum += float((lse - lg[np.arange(len(lg)), labels[sel]]).sum())
                correct += float((lg.argmax(-1) == labels[sel]).sum())
                n += sel.sum()
            return {"mlm_loss": loss_sum / n, "mlm_accuracy": correct / n}

        return inputs, score
    from jobs.data import load_tokenizer
    from jobs.tasks import Task, load_rows

    if not spec.data.test:
        return [], None
    tok = load_tokenizer(run_dir / contract.FINAL_DIR)
    task = Task(spec, tok, {"train": load_rows(spec.data.train, run_dir / ".hf-cache"),
                            "test": load_rows(spec.data.test, run_dir / ".hf-cache")})
    feats = task.features["test"]
    chunks = [list(range(i, min(i + 32, len(feats)))) for i in range(0, len(feats), 32)]
    inputs = []
    for chunk in chunks:
        b = task.collate([feats[i] for i in chunk])
        inputs.append((b["input_ids"].numpy(), b["attention_mask"].numpy()))

    def score(outputs):
        flat = []
        for chunk, out in zip(chunks, outputs):
            for j, i in enumerate(chunk):
                flat.append((i, out[0][j], out[1][j]) if task.type == "question-answering" else (i, out[0][j].argmax(-1)))
        return task.metrics("test", flat)

    return inputs, score


def export_onnx(run_dir: str | Path, quantize: bool = False, tolerance: float = TOLERANCE, log=print) -> dict:
    import onnxruntime as ort

    from launcher.loading import load_spec

    run_dir = Path(run_dir)
    final = run_dir / contract.FINAL_DIR
    if not (final / "config.json").exists():
        raise DataError(f"{final} does not exist: the run has not finished",
                        "wait for the job to finish (mbl status), or export a finished run directory")
    model, qa = _load(final)
    out_dir = final / "onnx"
    out_dir.mkdir(exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    wrapper = _Logits(model, qa)
    trace_len = model.config.local_attention + 16  # longer than the sliding window
    ids = torch.randint(5, model.config.vocab_size, (2, trace_len))
    names = ["start_logits", "end_logits"] if qa else ["logits"]
    axes = {n: {0: "batch", 1: "sequence"} for n in ["input_ids", "attention_mask", *names]}
    torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(onnx_path), input_names=["input_ids", "attention_mask"],
                      output_names=names, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    check_ids, check_mask = _eval_inputs(run_dir, model.config.vocab_size)
    got = _run(session, check_ids, check_mask)
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(check_ids), torch.from_numpy(check_mask))
    ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    valid = check_mask.astype(bool)
    # padded positions are not compared; per-sequence outputs (classification) have no positions
    diff = max(float((np.abs(g - r)[valid] if g.shape[:2] == valid.shape else np.abs(g - r)).max())
               for g, r in zip(got, ref))
    report = {"onnx": str(onnx_path), "max_abs_diff": diff, "tolerance": tolerance, "opset": OPSET}
    log(f"[mbl] ONNX export {onnx_path}: max |logit diff| vs PyTorch {diff:.2e} (tolerance {tolerance:g})")
    if diff > tolerance:
        raise ExportError(f"ONNX output differs from PyTorch by {diff:.2e} > {tolerance:g} ({onnx_path})",
                          f"see {out_dir}; a larger --tolerance accepts it, or export with another opset")
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q_path = out_dir / "model.int8.onnx"
        quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
        q_session = ort.InferenceSession(str(q_path), providers=["CPUExecutionProvider"])
        report["int8"] = {"onnx": str(q_path), "bytes": q_path.stat().st_size, "fp32_bytes": onnx_path.stat().st_size}
        spec = load_spec(run_dir / contract.SPEC_FILE) if (run_dir / contract.SPEC_FILE).exists() else None
        inputs, score = _metric_inputs(run_dir, spec) if spec else ([], None)
        if inputs and score:
            fp32_out = [_run(session, i, m) for i, m in inputs]
            int8_out = [_run(q_session, i, m) for i, m in inputs]
            same = [a[0].argmax(-1) == b[0].argmax(-1) for a, b in zip(fp32_out, int8_out)]
            same = [s[m.astype(bool)] if a[0].ndim == 3 else s for s, a, (_, m) in zip(same, fp32_out, inputs)]
            agree = np.mean(np.concatenate(same))
            report["int8"].update(fp32_metrics=score(fp32_out), int8_metrics=score(int8_out), top1_agreement=float(agree))
        log(f"[mbl] int8 {q_path}: " + json.dumps(report["int8"]))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--onnx", action="store_true", help="export final/ to ONNX and check it")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    if args.quantize != "none" and not args.onnx:
        print("error: --quantize needs --onnx", file=sys.stderr)
        return 2
    if args.onnx:
        try:
            export_onnx(args.run_dir, quantize=args.quantize == "int8", tolerance=args.tolerance)
        except MblError as exc:
            print(exc.render(), file=sys.stderr)
            return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
