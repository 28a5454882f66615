"""The trainer is device-correct, proved on the CPU: with MBL_DEVICE_CHECK=1 (jobs/devicecheck.py) a tensor
that never went to the engine's device fails the run where it reaches a collective or the model.

On the CPU the engine's device is the host, so comparing devices proves nothing; the check marks host tensors
instead (loader outputs, tensors made in jobs/ without device=) and the sinks refuse marked ones. The first
tests show the checker itself refuses what NCCL and a GPU model would; the last ones run the tiny pre-train
and a fine-tune from it under the check with two ranks (torchrun, gloo), and the precisions DeepSpeed runs
on this CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher import contract
from launcher.spec import JobSpec
from test_jobs_train import write_spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HERE = r"tests/test_jobs_device\.py:\d+"


# ---- the checker, in this process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from jobs import data as D

    out = tmp_path_factory.mktemp("prep") / "data"
    spec = JobSpec.model_validate({
        "kind": "prepare", "name": "device",
        "data": {"train": [str(REPO / "examples/data/corpus.txt")], "vocab_size": 512, "seq_len": 64},
        "train": {"max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
        "checkpoint": {"dir": str(out.parent), "every_steps": 1},
    })
    D.prepare(spec, out, log=lambda m: None)
    return out


@pytest.fixture
def checked():
    """A one-rank gloo process group in this process, with the device check on for the CPU."""
    import torch.distributed as dist

    from jobs import devicecheck

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    devicecheck.install(torch.device("cpu"))
    try:
        yield devicecheck
    finally:
        devicecheck.uninstall()
        dist.destroy_process_group()


def tiny_mlm(vocab: int):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    return ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2))


def test_a_loader_batch_is_refused_by_all_reduce_and_forward_until_moved(checked, prepared):
    import torch.distributed as dist

    from jobs import data as D
    from jobs.device import to_device
    from jobs.devicecheck import DeviceCheckError, HostTensor

    batcher = D.MLMBatcher(D.PackedDataset(prepared, "train"), 2, 0, 1, 1, 0, 0.3)
    batch = batcher.batch(0, 0)
    assert all(isinstance(t, HostTensor) for t in batch.values())
    total = (batch["labels"] != -100).sum().float().reshape(1)  # derived from the batch: still on the host
    with pytest.raises(DeviceCheckError, match=rf"torch.distributed.all_reduce at .*{HERE} \(test_a_loader.*\) gets "
                       r"argument 0: a host tensor made at jobs/data.py:\d+ \(\w+\), never moved"):
        dist.all_reduce(total)
    model = tiny_mlm(batcher.vocab_size)
    checked.watch(model, "cpu")
    with pytest.raises(DeviceCheckError, match=rf"forward of ModernBertForMaskedLM at .*{HERE} .* gets `input_ids`: "
                       r"a host tensor made at jobs/data.py:\d+ \(\w+\)"):
        model(**batch)

    moved = to_device(batch, torch.device("cpu"))
    assert not any(isinstance(t, HostTensor) for t in moved.values())
    out = model(**moved)
    loss = out.loss.detach().reshape(1)
    dist.all_reduce(loss)
    assert torch.isfinite(loss).all()
    assert checked.report().startswith("device check: 2 forward of ModernBertForMaskedLM, 2 torch.distributed."
                                       "all_reduce checked")


def test_marks_follow_the_tensor_and_factories_in_jobs_code(checked):
    import torch.distributed as dist

    from jobs import data as D
    from jobs.checkpoint import StopFlag
    from jobs.devicecheck import DeviceCheckError, HostTensor, mark

    host = mark(torch.arange(6.0), "here")
    for derived in (host + 1, host[1:3], host.to(torch.float64), host.cpu(), host.view(2, 3).sum(0),
                    torch.cat([host, torch.ones(2)]), torch.where(host > 2, host, torch.zeros(6))):
        assert isinstance(derived, HostTensor) and derived._mbl_origin == "here"
    for moved in (host.to("cpu"), host.to(device=torch.device("cpu")), host.to(torch.zeros(1)),
                  host.to("cpu", torch.float16)):
        assert type(moved) is torch.Tensor

    # A factory call in jobs/ code without device= makes a host tensor (torch.from_numpy in sample_uniforms), one
    # here does not; what mask_tokens derives from it stays marked.
    ids = torch.randint(5, 100, (2, 16))
    assert type(ids) is torch.Tensor
    special = torch.zeros(100, dtype=torch.bool)
    r = D.sample_uniforms(0, np.arange(2), 16, 0)
    inputs, labels = D.mask_tokens(ids, r, r, 0.3, 4, 100, special)
    assert isinstance(labels, HostTensor) and isinstance(inputs, HostTensor)
    assert labels._mbl_origin.startswith("jobs/data.py:") and labels._mbl_origin.endswith("(sample_uniforms)")
    with pytest.raises(DeviceCheckError, match=r"host tensor made at jobs/data.py:\d+ \(sample_uniforms\)"):
        dist.broadcast(labels, src=0)

    # The stop flag makes its tensor with device=: its all_reduce passes the check.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        flag = StopFlag(torch.device("cpu"))
        assert flag.should_stop(None, 0.0) == (False, "")  # started; read at the next boundary
        flag.signal = signal.SIGUSR1
        assert flag.should_stop(None, 0.0) == (False, "")  # the first boundary's answer: nobody asked to stop
        assert flag.should_stop(None, 0.0) == (True, "signal SIGUSR1")
        flag.drain()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ---- the trainer under the check, two ranks -----------------------------------------------------------

CHECKED_PRETRAIN = ["train.max_steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
                    "train.warmup_steps=0", "train.log_every_steps=2", "train.eval_every_steps=3",
                    "train.eval_batches=1", "checkpoint.every_steps=3"]


def torchrun(spec: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train", "--spec", str(spec)]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / contract.METRICS_FILE).read_text().splitlines()]
    return [r for r in rows if "split" not in r]


@pytest.mark.slow
def test_pretrain_and_finetune_pass_the_device_check(tmp_path):
    """Two ranks, gradient accumulation 2, held-out evaluations, periodic saves, a fine-tune with evaluations
    and a test set: every batch, loss, metric and stop flag goes through a checked sink, and none is on the host."""
    env = {"MBL_DEVICE_CHECK": "1"}
    pre = tmp_path / "pretrain"
    proc = torchrun(write_spec("examples/pretrain-tiny.yaml", pre, *CHECKED_PRETRAIN), env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[mbl] device check on (MBL_DEVICE_CHECK=1)" in out
    counts = out[out.index("[mbl] device check: "):].splitlines()[0]
    assert "forward of DeepSpeedEngine" in counts and "torch.distributed.all_reduce" in counts, counts
    assert [r["step"] for r in train_rows(pre)] == [2, 4, 6]
    assert (pre / contract.DONE_FILE).exists()

    fine = tmp_path / "finetune"
    proc = torchrun(write_spec("examples/finetune-tiny.yaml", fine, f"model.init_from={pre}", "train.epochs=null",
                               "train.max_steps=4", "train.warmup_steps=0", "train.log_every_steps=2",
                               "train.eval_every_steps=2", "checkpoint.every_steps=2"), env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    counts = out[out.index("[mbl] device check: "):].splitlines()[0]
    assert "forward of ModernBertForSequenceClassification" in counts, counts  # the test set, on the best model
    summary = json.loads((fine / contract.SUMMARY_FILE).read_text())
    assert set(summary["test"]) >= {"accuracy", "f1", "loss"}


def _fp16_on_this_cpu() -> str | None:
    """None if DeepSpeed runs fp16 here; else why not (its CPU accelerator asks oneDNN for fp16 kernels)."""
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return None
    return ("DeepSpeed 0.19 refuses fp16 on this CPU: `ValueError: Type fp16 is not supported on your device.` "
            "(its CPU accelerator needs oneDNN fp16, i.e. AVX512-FP16 or AMX-FP16)")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_a_few_steps(tmp_path, precision):
    """DeepSpeed's bf16 (and fp16, where this CPU has the kernels) with deterministic algorithms on."""
    if precision == "fp16" and _fp16_on_this_cpu():
        pytest.skip(_fp16_on_this_cpu())
    run = tmp_path / precision
    proc = torchrun(write_spec("examples/pretrain-tiny.yaml", run, f"train.precision={precision}",
                               "train.deterministic=true", "train.max_steps=6", "train.global_batch_size=16",
                               "train.micro_batch_size=8", "train.warmup_steps=0", "train.log_every_steps=1",
                               "train.eval_every_steps=6", "train.eval_batches=1", "checkpoint.every_steps=3"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[mbl] deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=:4096:8)" in out
    weights = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert f"{precision} (weights {weights} on cpu)" in out, out[-3000:]
    rows = train_rows(run)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert summary["heldout_loss"] < summary["heldout_loss_start"], summary
