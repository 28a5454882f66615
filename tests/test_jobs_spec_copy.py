"""The trainer keeps the spec it runs in the run directory (Kubernetes mounts it from a ConfigMap elsewhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from launcher.loading import load_spec

REPO = Path(__file__).resolve().parents[1]


def _spec_file(tmp_path: Path, run_dir: Path, **train) -> Path:
    spec = load_spec(REPO / "examples" / "prepare-tiny.yaml",
                     [f"checkpoint.dir={run_dir}", f"data.train=[{REPO / 'examples' / 'data' / 'corpus.txt'}]",
                      "distributed.gpus_per_node=1", *(f"train.{k}={v}" for k, v in train.items())])
    mounted = tmp_path / "etc-mbl" / "spec.yaml"
    mounted.parent.mkdir(parents=True, exist_ok=True)
    mounted.write_text(spec.to_yaml())
    return mounted


def _train(spec: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.train", "--spec", str(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_spec_from_elsewhere_is_copied_into_a_new_run_dir(tmp_path, mbl_env):
    run_dir = tmp_path / "run"
    mounted = _spec_file(tmp_path, run_dir)
    proc = _train(mounted, mbl_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert yaml.safe_load((run_dir / "spec.yaml").read_text()) == yaml.safe_load(mounted.read_text())
    assert (run_dir / "DONE").exists()


def test_a_run_dir_of_another_job_is_refused(tmp_path, mbl_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(_spec_file(tmp_path, run_dir, seed=1).read_text())
    proc = _train(_spec_file(tmp_path, run_dir, seed=2), mbl_env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "already holds a different job" in proc.stderr and "train.seed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "seed: 1" in (run_dir / "spec.yaml").read_text()
