"""The files in examples/, by what they are: job specs, pipelines, the quota policy."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
QUOTA_POLICY = EXAMPLES_DIR / "quota.yaml"
PIPELINES = sorted(EXAMPLES_DIR.glob("pipeline*.yaml"))  # tests/test_pipeline.py
JOB_SPECS = sorted(p for p in EXAMPLES_DIR.glob("*.yaml") if p != QUOTA_POLICY and p not in PIPELINES)
