"""The trainer for real: two ranks under torchrun on CPU (DeepSpeed, gloo).

One tiny pre-training (examples/pretrain-tiny.yaml) is shared by every test of this module; the fine-tunes
start from it. Resume tests compare against it bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import contract
from launcher.loading import load_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_spec(example: str, run_dir: Path, *sets: str) -> Path:
    spec = load_spec(REPO / example, sets=[f"checkpoint.dir={run_dir}", *sets]).resolved(REPO)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / contract.SPEC_FILE
    path.write_text(spec.to_yaml())
    return path


def torchrun(spec: Path, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train", "--spec", str(spec)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **popen)


def spawn_ranks(spec: Path, world: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """The ranks without torchrun, so that each rank's exit code and signals are ours to see."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "jobs.train", "--spec", str(spec)], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / contract.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "split" not in r]


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        rows = train_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def mbl_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "[mbl]" in line or "warning" in line or "rror" in line)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny-pretrain"
    t0 = time.time()
    ok(torchrun(write_spec("examples/pretrain-tiny.yaml", run)))
    return run, time.time() - t0


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny-finetune"
    t0 = time.time()
    ok(torchrun(write_spec("examples/finetune-tiny.yaml", run, f"model.init_from={pretrained[0]}")))
    return run, time.time() - t0


def test_pretrain_halves_heldout_loss(pretrained):
    run, _ = pretrained
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert summary["heldout_loss"] <= 0.5 * summary["heldout_loss_start"], summary
    assert (run / contract.DONE_FILE).exists()
    rows = train_rows(run)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "data_share"} <= set(rows[-1])
    assert all(0 <= r["data_share"] < 1 for r in rows), [r["data_share"] for r in rows]
    assert rows[-1]["step"] == 150 and rows[-1]["grad_norm"] > 0
    assert any((run / "tb").iterdir())
    assert (run / contract.LATEST_FILE).read_text().strip() == "checkpoints/step-00000100"
    assert sorted(p.name for p in (run / contract.CHECKPOINTS_DIR).glob("step-*")) == ["step-00000050",
                                                                                        "step-00000100"]


def test_final_loads_as_masked_lm_and_fill_mask_runs(pretrained):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, ModernBertForMaskedLM, pipeline

    final = pretrained[0] / contract.FINAL_DIR
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert type(model) is ModernBertForMaskedLM
    fill = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(final))
    out = fill("alice smith works for [MASK] .")
    assert len(out) == 5 and all("token_str" in o for o in out)


def test_finetune_classification_and_main_job_time(pretrained, finetuned):
    run, seconds = finetuned
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert summary["test"]["accuracy"] >= 0.9, summary
    assert summary["test_baseline"]["accuracy"] < 0.6
    assert pretrained[1] + seconds < 300, (pretrained[1], seconds)
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(run / contract.FINAL_DIR))
    assert clf("the phone was awful .")[0]["label"] == "negative"


@pytest.mark.parametrize("example,epochs,metric,margin", [("examples/finetune-ner-tiny.yaml", 1, "f1", 0.5),
                                                          ("examples/finetune-qa-tiny.yaml", 2, "exact_match", 0.2)])
def test_ner_and_qa_beat_trivial_baselines(pretrained, tmp_path, example, epochs, metric, margin):
    run = tmp_path / "run"
    ok(torchrun(write_spec(example, run, f"model.init_from={pretrained[0]}", f"train.epochs={epochs}")))
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert summary["test"][metric] >= summary["test_baseline"][metric] + margin, summary


def test_onnx_matches_pytorch_and_int8_is_reported(pretrained):
    from jobs.export import export_onnx

    report = export_onnx(pretrained[0], quantize=True, log=lambda m: None)
    assert report["max_abs_diff"] <= 1e-4
    q = report["int8"]
    assert q["bytes"] < q["fp32_bytes"] / 2
    assert abs(q["int8_metrics"]["mlm_loss"] - q["fp32_metrics"]["mlm_loss"]) < 0.2
    proc = subprocess.run([sys.executable, "-m", "jobs.export", str(pretrained[0]), "--onnx"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "max |logit diff|" in proc.stdout


def test_finished_job_exits_at_once(pretrained):
    run = pretrained[0]
    before = len(metrics(run))
    proc = spawn_ranks(run / contract.SPEC_FILE, world=1)[0]
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "nothing to do" in out
    assert len(metrics(run)) == before


def test_kill9_during_a_background_write_resumes_bit_identical_then_corrupt_latest_falls_back(pretrained, tmp_path):
    """Rank 1's background write of the step-100 checkpoint is held (MBL_FAULT_WRITE_DELAY) while training goes on
    past step 110, then kill -9 of the whole job: `latest` still names step 50, and the restart resumes there and
    ends bit for bit where the uninterrupted run ended."""
    ref = pretrained[0]
    run = tmp_path / "tiny-pretrain"
    spec = write_spec("examples/pretrain-tiny.yaml", run)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "jobs.train", "--spec", str(spec)]
    env = {**os.environ, "MBL_FAULT_WRITE_DELAY": "600@100", "MBL_FAULT_RANK": "1"}
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env=env)
    try:
        wait_for_step(run, 110)
    finally:
        for pid in descendants(job.pid):  # kill -9 of the whole job: torchrun and every rank at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()
    assert not (run / contract.DONE_FILE).exists()
    killed_at = train_rows(run)[-1]["step"]
    assert 110 <= killed_at < 150
    assert (run / contract.LATEST_FILE).read_text().strip() == "checkpoints/step-00000050"
    assert (run / "checkpoints/.tmp-step-00000100").is_dir() and not (run / "checkpoints/step-00000100").exists()
    out = ok(torchrun(spec))
    assert "resumed from checkpoints/step-00000050" in out, mbl_lines(out)
    weights = contract.FINAL_DIR + "/model.safetensors"
    assert (run / weights).read_bytes() == (ref / weights).read_bytes()
    ref_loss = {r["step"]: r["loss"] for r in train_rows(ref)}
    rows = train_rows(run)
    assert [r["step"] for r in rows].count(60) == 2  # steps 51..70 ran twice: before the kill and after
    assert all(r["loss"] == ref_loss[r["step"]] for r in rows)

    # Corrupt the newest checkpoint: resume warns and falls back to the one before, with the same result.
    for name in (contract.DONE_FILE, contract.SUMMARY_FILE):
        (run / name).unlink()
    shutil.rmtree(run / contract.FINAL_DIR)
    victim = run / "checkpoints/step-00000100/mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = ok(torchrun(spec))
    assert "warning: checkpoint checkpoints/step-00000100 is unusable" in out, mbl_lines(out)
    assert "resumed from checkpoints/step-00000050" in out, mbl_lines(out)
    assert (run / weights).read_bytes() == (ref / weights).read_bytes()


def test_signals_save_at_the_current_step_and_exit_75(pretrained, tmp_path):
    run = tmp_path / "sig"
    spec = write_spec("examples/pretrain-tiny.yaml", run, f"data.prepared={pretrained[0]}", "train.max_steps=400",
                      "checkpoint.every_steps=400", "train.eval_every_steps=400", "train.log_every_steps=1")
    # SIGUSR1 to one rank only: the ranks agree at the step boundary and both save and exit 75.
    procs = spawn_ranks(spec)
    wait_for_step(run, 3)
    procs[1].send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [contract.REQUEUE_EXIT_CODE] * 2, outs
    saved = json.loads((run / "checkpoints" / (run / contract.LATEST_FILE).read_text().strip().split("/")[-1]
                        / "trainer_state.json").read_text())["step"]
    assert saved == train_rows(run)[-1]["step"] >= 3  # the last step taken is the one saved: none lost

    # Resume, then SIGTERM to rank 0: the run continues at saved + 1 and stops again with 75.
    procs = spawn_ranks(spec)
    wait_for_step(run, saved + 2)
    procs[0].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [contract.REQUEUE_EXIT_CODE] * 2, outs
    steps = [r["step"] for r in train_rows(run)]
    assert steps[steps.index(saved) + 1] == saved + 1
    latest = (run / contract.LATEST_FILE).read_text().strip()
    assert latest == f"checkpoints/step-{steps[-1]:08d}"

    # Near the deadline (MBL_DEADLINE): the first boundary sees it, the ranks agree at the second; save, exit 75.
    procs = spawn_ranks(spec, env={"MBL_DEADLINE": str(time.time() + 1000), "MBL_DEADLINE_MARGIN": "990"})
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [contract.REQUEUE_EXIT_CODE] * 2, outs
    assert "time limit" in outs[0]
    assert train_rows(run)[-1]["step"] == steps[-1] + 2


@pytest.mark.parametrize("stage,extra", [(0, []), (1, ["train.schedule=cosine"]),
                                         (2, ["data.objective=mlm+sop", "train.schedule=wsd"]), (3, [])])
def test_zero_stages_train(pretrained, tmp_path, stage, extra):
    from transformers import AutoModelForMaskedLM

    run = tmp_path / f"zero{stage}"
    spec = write_spec("examples/pretrain-tiny.yaml", run, f"data.prepared={pretrained[0]}",
                      f"distributed.zero_stage={stage}", "train.max_steps=8", "train.warmup_steps=0",
                      "train.global_batch_size=8", "train.micro_batch_size=4", "checkpoint.every_steps=4",
                      "train.eval_every_steps=8", "train.eval_batches=1", "train.log_every_steps=1", *extra)
    ok(torchrun(spec))
    rows = train_rows(run)
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, rows
    assert AutoModelForMaskedLM.from_pretrained(run / contract.FINAL_DIR) is not None


def test_a_hung_rank_is_caught_with_stacks_requeued_and_the_job_resumes(pretrained, tmp_path):
    """Rank 1 sleeps at step 12 (MBL_FAULT_HANG); rank 0 waits for it in a collective. Within the 8 s hang limit
    both ranks log their stacks and exit 76, the launch classifies a hang and exits 143 (requeue); the next
    attempt resumes from step 10 and finishes. The process group's timeout comes from the spec."""
    from launcher.outcomes import records
    from launcher.torchrun import torchrun_args

    run = tmp_path / "hang"
    spec = write_spec("examples/pretrain-tiny.yaml", run, f"data.prepared={pretrained[0]}", "train.max_steps=30",
                      "train.warmup_steps=0", "checkpoint.every_steps=10", "train.eval_every_steps=30",
                      "train.log_every_steps=1", "distributed.hang_timeout_seconds=8",
                      "distributed.collective_timeout_seconds=120")
    args = torchrun_args(load_spec(spec), ["--standalone", "--nnodes=1"])
    cmd = [sys.executable, "-m", "jobs.launch", "--spec", str(spec), "--", *args]
    env = {**os.environ, "MBL_BACKEND": "local", "MBL_JOB_ID": "hang-test", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    first = subprocess.run(cmd, cwd=REPO, env={**env, "MBL_ATTEMPT": "0", "MBL_FAULT_HANG": "1@12"},
                           capture_output=True, text=True, timeout=240)
    log = first.stdout + first.stderr
    assert first.returncode == contract.LAUNCH_REQUEUE, log[-4000:]
    hung_at = next(r["time"] for r in train_rows(run) if r["step"] == 12)
    assert time.time() - t0 < 200
    assert "MBL_FAULT_HANG: rank 1 sleeps at step 12" in log
    assert "[mbl] hang: rank 1" in log and "[mbl] hang: rank 0" in log, log[-4000:]
    assert "in fault_hang" in log  # rank 1's stack shows where it is
    [record] = records(run)
    assert record["cause"] == "hang" and record["outcome"] == "requeue", record
    assert "no progress on rank(s)" in record["reason"]
    assert (run / contract.LATEST_FILE).read_text().strip() == "checkpoints/step-00000010"
    detected = max(p.stat().st_mtime for p in (run / contract.LOGS_DIR).glob("outcome-*.json"))
    assert detected - hung_at < 8 + 30, (detected - hung_at)  # the limit, plus shutdown and classification

    second = subprocess.run(cmd, cwd=REPO, env={**env, "MBL_ATTEMPT": "1"}, capture_output=True, text=True,
                            timeout=240)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resumed from checkpoints/step-00000010" in second.stdout + second.stderr
    assert (run / contract.DONE_FILE).exists()


@pytest.mark.parametrize("stage,before,after", [(1, 2, 1), (3, 1, 2)])
def test_resume_on_another_world_size_matches_the_uninterrupted_run(pretrained, tmp_path, stage, before, after):
    """Saved on `before` ranks at step 8 (killed at once: MBL_FAULT_AT=retention@8), resumed on `after` ranks to
    step 12, with the same global batch (one rank accumulates two micro batches where two ranks take one each).
    DeepSpeed's partitioned state goes through its universal checkpoint; every step reads the same samples,
    masked the same way (jobs/data.py), so the loss of every step matches the uninterrupted run on `before` ranks
    to within 1e-3 relative (measured: 5e-8 for ZeRO 1, 3e-4 for ZeRO 3: the order of the sums differs)."""
    sets = [f"data.prepared={pretrained[0]}", f"distributed.zero_stage={stage}", "train.max_steps=12",
            "train.warmup_steps=2", "checkpoint.every_steps=4", "checkpoint.keep_last=1", "train.eval_every_steps=12",
            "train.eval_batches=1", "train.log_every_steps=1"]

    def run_on(run: Path, ranks: int, env: dict | None = None) -> subprocess.CompletedProcess:
        spec = write_spec("examples/pretrain-tiny.yaml", run, *sets, f"distributed.gpus_per_node={ranks}")
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m", "jobs.train", "--spec",
               str(spec)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **(env or {})})

    ref, run = tmp_path / "uninterrupted", tmp_path / "moved"
    ok(run_on(ref, before))
    killed = run_on(run, before, {"MBL_FAULT_AT": "retention@8", "MBL_FAULT_KILL": "group"})
    assert killed.returncode != 0 and "MBL_FAULT_AT: SIGKILL at retention of step 8" in killed.stdout
    assert (run / contract.LATEST_FILE).read_text().strip() == "checkpoints/step-00000008"
    out = ok(run_on(run, after))
    assert (f"resharded checkpoints/step-00000008 from {before} to {after} ranks: converted to DeepSpeed's "
            f"universal checkpoint (ZeRO {stage})") in out, mbl_lines(out)
    assert "resumed from checkpoints/step-00000008 at step 8" in out
    expected = {r["step"]: r["loss"] for r in train_rows(ref)}
    rows = train_rows(run)
    assert [r["step"] for r in rows][-4:] == [9, 10, 11, 12]
    for r in rows[-4:]:
        assert abs(r["loss"] - expected[r["step"]]) <= 1e-3 * expected[r["step"]], (r, expected)
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 32 * 128  # every global sample, once
