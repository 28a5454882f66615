"""Experiment tracking (jobs/tracking.py, the spec's `tracking:`): one MLflow run and one W&B run per run
directory, whatever the attempts, with no step sent twice; the real libraries, offline (MLflow's file store,
W&B's offline mode), no network.

- A tiny pre-training with both trackers, stopped by SIGUSR1 (the requeue path: save, exit 75) and resumed to
  the end: one MLflow run holds every step of both attempts once, at the steps of metrics.jsonl, with the spec
  as params and the summary; the W&B folder holds one offline run per attempt, all with one id, whose steps
  together are those of metrics.jsonl, once each. The W&B key comes from a secret's variable and is written
  nowhere.
- The Tracker alone (no torch): a crash that resumes from an older checkpoint repeats steps, which are not sent
  again; a tracker that fails warns, training goes on, and it catches up from metrics.jsonl with no gap.
- The launcher never imports mlflow or wandb; the spec's rules for credentials.
"""

from __future__ import annotations

import glob
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import contract
from launcher.errors import MblError
from launcher.loading import load_spec
from test_jobs_train import spawn_ranks, train_rows, wait_for_step, write_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/pretrain-tiny.yaml"
KEY_VAR = "MBL_TEST_WANDB_KEY"


# ---- reading what the trackers wrote -----------------------------------------------------------------------


def mlflow_runs(store: Path, experiment: str = "mbl") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def mlflow_steps(store: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=store.as_uri()).get_metric_history(run_id, key)
    return sorted(m.step for m in history)


def wandb_records(path: str) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log: 7-byte header, 32 KiB blocks, chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def wandb_offline(wandb_dir: Path) -> list[dict]:
    """One dict per offline run folder: its run id, and its history rows ({key: value} with `_step`)."""
    runs = []
    for folder in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))):
        (path,) = glob.glob(f"{folder}/run-*.wandb")
        ids, rows, config = set(), [], {}
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                config.update({i.key: i.value_json for i in rec.run.config.update})
            elif kind == "config":
                config.update({i.key: i.value_json for i in rec.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        runs.append({"folder": folder, "ids": ids, "rows": rows, "config": config})
    return runs


def wandb_steps(runs: list[dict], key: str) -> list[int]:
    return sorted(row["_step"] for run in runs for row in run["rows"] if key in row)


# ---- a tiny pre-training, stopped and resumed --------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_and_resumed_pretrain_is_one_run_in_mlflow_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the store here (the trainer sets it itself)
    run, store, wdir = tmp_path / "run", tmp_path / "mlruns", tmp_path / "wandb"
    key_file = tmp_path / "wandb-key"
    key = "mbl-wandb-key-" + "7f3a" * 9
    key_file.write_text(key + "\n")
    sets = ["distributed.gpus_per_node=1", "train.global_batch_size=8", "train.micro_batch_size=8",
            "train.warmup_steps=0", "train.log_every_steps=1", "train.eval_every_steps=400", "train.eval_batches=1",
            "checkpoint.every_steps=400", "data.vocab_size=512", f"tracking.mlflow.uri={store}",
            "tracking.wandb.mode=offline", f"tracking.wandb.dir={wdir}", f"secrets.{KEY_VAR}.file={key_file}",
            f"tracking.wandb.api_key_secret={KEY_VAR}"]
    spec = write_spec(EXAMPLE, run, "train.max_steps=400", *sets)
    env = {KEY_VAR: key, "WANDB_SILENT": "true"}

    (proc,) = spawn_ranks(spec, world=1, env=env)  # attempt 1: SIGUSR1 after step 3, the requeue path
    try:
        wait_for_step(run, 3, timeout=240)
    finally:
        proc.send_signal(signal.SIGUSR1)
    out1 = proc.communicate(timeout=120)[0]
    assert proc.returncode == contract.REQUEUE_EXIT_CODE, out1[-3000:]
    stopped = train_rows(run)[-1]["step"]
    assert "tracking: mlflow new run" in out1 and "tracking: wandb run" in out1, out1[-3000:]

    end = stopped + 3  # attempt 2: resume to the end, three steps on
    spec = write_spec(EXAMPLE, run, *sets, f"train.max_steps={end}", f"checkpoint.every_steps={end}")
    (proc,) = spawn_ranks(spec, world=1, env=env)
    out2 = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out2[-3000:]
    assert f"resumed from checkpoints/step-{stopped:08d}" in out2
    assert f"it has the steps up to heldout 0, train {stopped}" in out2, out2[-3000:]
    assert "warning: tracking" not in out1 + out2

    steps = [r["step"] for r in train_rows(run)]
    assert steps == list(range(1, end + 1)), steps  # metrics.jsonl: every step once, none lost
    state = json.loads((run / contract.TRACKING_FILE).read_text())

    # MLflow: one run, both attempts' steps once each, the spec as params, the summary, finished.
    (mrun,) = mlflow_runs(store)
    assert mrun.info.run_id == state["mlflow"]["run_id"] and mrun.info.status == "FINISHED"
    assert mrun.data.tags["mbl.run_key"] == state["key"] == state["wandb"]["id"]
    assert state["key"].startswith(f"tiny-pretrain-{load_spec(spec).training_fingerprint()[:8]}-")
    assert mlflow_steps(store, mrun.info.run_id, "train/loss") == steps
    assert mlflow_steps(store, mrun.info.run_id, "heldout/loss") == [0, end]
    assert mrun.data.params["train.max_steps"] == "400"  # params are the first attempt's, sent once
    assert mrun.data.params["model.preset"] == "tiny" and "secrets." + KEY_VAR + ".file" not in mrun.data.params
    summary = json.loads((run / contract.SUMMARY_FILE).read_text())
    assert mrun.data.metrics["summary/heldout_loss"] == pytest.approx(summary["heldout_loss"])

    # W&B offline: one folder per attempt, one run id in all, the steps of metrics.jsonl once each.
    wruns = wandb_offline(wdir)
    assert len(wruns) == 2 and all(r["ids"] == {state["key"]} for r in wruns), wruns
    assert wandb_steps(wruns, "train/loss") == steps
    assert wandb_steps(wruns, "heldout/loss") == [0, end]
    assert json.loads(wruns[0]["config"]["train.lr"]) == 0.002  # the spec as config, each attempt's own
    assert [json.loads(r["config"]["train.max_steps"]) for r in wruns] == [400, end]
    assert not any(k.split(".")[0] in ("env", "secrets") for k in wruns[1]["config"])

    # The key, read from the secret's variable, is in no file of the run, the stores, or the log.
    for root in (run, store, wdir):
        for path in root.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path
    assert key not in out1 + out2


# ---- the Tracker alone: repeated steps, failures, catching up ----------------------------------------------


def _rows(run_dir: Path, steps: list[int], split: str = "train") -> list[dict]:
    rows = [{"time": time.time(), "step": s, "total_steps": 10, "loss": 10.0 - s + (0.5 if split == "train" else 0),
             "lr": 0.1, "grad_norm": None, **({"split": split} if split != "train" else {})} for s in steps]
    return rows


def _attempt(spec, run_dir: Path, rows: list[dict], end: int | None, logs: list[str], between=None) -> None:
    from jobs.tracking import Tracker, close_trackers

    tracker = Tracker(spec, run_dir, logs.append, 0)
    for i, row in enumerate(rows):
        with open(run_dir / contract.METRICS_FILE, "a") as f:  # as Context.record: the file first
            f.write(json.dumps(row) + "\n")
        tracker.record(row)
        if between:
            between(i)
    if end == 0:
        tracker.finish({"steps": 10, "heldout_loss": 1.25, "kind": "pretrain"})
    elif end is not None:
        close_trackers(end)
    time.sleep(1.0)  # W&B names an offline folder by the second it starts: attempts a second apart, as real ones are


def test_repeated_steps_are_not_sent_again_and_a_failing_tracker_catches_up(tmp_path, monkeypatch):
    import jobs.tracking as tracking

    for name, value in (("MLFLOW_ALLOW_FILE_STORE", "true"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    run, store, wdir = tmp_path / "run", tmp_path / "mlruns", tmp_path / "wandb"
    run.mkdir()
    spec = load_spec(REPO / EXAMPLE, sets=[f"checkpoint.dir={run}", f"tracking.mlflow.uri={store}",
                                           "tracking.wandb.mode=offline", f"tracking.wandb.dir={wdir}"])
    logs: list[str] = []
    _attempt(spec, run, _rows(run, [0], "heldout") + _rows(run, [1, 2, 3, 4, 5]), 75, logs)
    # A crash after step 5 resumes from the step-3 checkpoint: steps 4 and 5 come again; then step 6 and 7.
    _attempt(spec, run, _rows(run, [4, 5, 6, 7]), 1, logs)
    # As if an attempt had ended between making the MLflow run and keeping its id: the next finds it by its tag.
    state = json.loads((run / contract.TRACKING_FILE).read_text())
    del state["mlflow"]["run_id"]
    (run / contract.TRACKING_FILE).write_text(json.dumps(state))

    # The MLflow store breaks (a file where its folder was) during attempt 3: a warning, and the rows go on.
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    moved = tmp_path / "mlruns-away"

    def outage(i: int) -> None:
        if i == 0:
            store.rename(moved)
            store.write_text("not a folder")
        if i == 2:
            store.unlink()
            moved.rename(store)

    logs3: list[str] = []
    _attempt(spec, run, _rows(run, [8, 9, 10]) + _rows(run, [10], "heldout"), 0, logs3, between=outage)
    assert any("warning: tracking: mlflow failed" in line and "training goes on" in line for line in logs3), logs3
    assert any(line.startswith("tracking: mlflow found run") for line in logs3), logs3

    (mrun,) = mlflow_runs(store)
    assert mrun.info.status == "FINISHED"
    assert mlflow_steps(store, mrun.info.run_id, "train/loss") == list(range(1, 11))
    assert mlflow_steps(store, mrun.info.run_id, "heldout/loss") == [0, 10]
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=store.as_uri()).get_metric_history(mrun.info.run_id, "train/loss")
    assert {m.step: m.value for m in history}[5] == 5.5  # the first value of a repeated step is kept
    assert mrun.data.metrics["summary/heldout_loss"] == 1.25

    wruns = wandb_offline(wdir)
    assert len(wruns) == 3 and {i for r in wruns for i in r["ids"]} == {json.loads(
        (run / contract.TRACKING_FILE).read_text())["key"]}
    assert wandb_steps(wruns, "train/loss") == list(range(1, 11))

    # Tracking turned on in the middle of a run: the new tracker gets the whole history of metrics.jsonl.
    later = load_spec(REPO / EXAMPLE, sets=[f"checkpoint.dir={run}", f"tracking.mlflow.uri={tmp_path / 'other'}"])
    _attempt(later, run, _rows(run, [11]), 0, logs)
    (orun,) = mlflow_runs(tmp_path / "other")
    assert mlflow_steps(tmp_path / "other", orun.info.run_id, "train/loss") == list(range(1, 12))


def test_missing_package_stops_every_rank_with_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from jobs.tracking import Tracker

    spec = load_spec(REPO / EXAMPLE, sets=[f"checkpoint.dir={tmp_path}", "tracking.wandb.mode=offline"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for rank in (0, 1):
        with pytest.raises(MblError) as err:
            Tracker(spec, tmp_path, print, rank)
        assert "tracking.wandb" in str(err.value) and "mbl[tracking]" in err.value.render()
    assert Tracker(load_spec(REPO / EXAMPLE), tmp_path, print, 0).backends == []  # no tracking: nothing to do
    assert not (tmp_path / contract.TRACKING_FILE).exists()


# ---- the launcher side -------------------------------------------------------------------------------------


def test_launcher_renders_tracking_without_importing_trackers(mbl_env):
    code = (
        "import sys; from launcher.cli import cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(cli, ['render', 'examples/pretrain-tiny.yaml', '--set', 'tracking.mlflow.uri=/x',\n"
        "                             '--set', 'tracking.wandb.mode=offline'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'tracking:' in r.output, r.output\n"
        "print([m for m in ('mlflow', 'wandb', 'torch') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=mbl_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_spec_rules_for_tracker_credentials():
    base = ["tracking.wandb.mode=offline"]
    with pytest.raises(MblError) as err:
        load_spec(REPO / EXAMPLE, sets=[*base, "tracking.wandb.api_key_secret=WANDB_API_KEY"])
    assert "tracking.wandb.api_key_secret names no entry of `secrets`" in err.value.render()
    with pytest.raises(MblError) as err:
        load_spec(REPO / EXAMPLE, sets=["env.MLFLOW_TRACKING_TOKEN=abc"])
    assert "move it to secrets.MLFLOW_TRACKING_TOKEN" in err.value.render()
    with pytest.raises(MblError):
        load_spec(REPO / EXAMPLE, sets=["tracking.wandb.project=a/b"])
    ok = load_spec(REPO / EXAMPLE, sets=[*base, "tracking.wandb.api_key_secret=WANDB_API_KEY",
                                         "secrets.WANDB_API_KEY.file=/run/secrets/wandb"])
    assert ok.tracking.wandb.api_key_secret == "WANDB_API_KEY" and ok.tracking.mlflow is None
    # tracking is no part of the training fingerprint: turning it on resumes the same run directory
    assert ok.training_fingerprint() == load_spec(REPO / EXAMPLE).training_fingerprint()
