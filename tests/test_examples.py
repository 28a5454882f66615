"""Examples an ops team can start from: the quota policy matches the dev cluster's accounts, validates with the
job specs, and the README points at it; `mbl export` without an export flag says which flags there are."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from launcher.cli import cli
from launcher.quota import load_policy

REPO = Path(__file__).resolve().parents[1]


def test_every_example_validates_the_policy_as_a_policy():
    files = sorted((REPO / "examples").glob("*.yaml"))
    assert REPO / "examples" / "quota.yaml" in files
    result = CliRunner().invoke(cli, ["validate", *map(str, files)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("ok: ") == len(files)
    assert "quota.yaml: quota policy, teams nlp (4 GPUs), vision (8 GPUs), ops (8 GPUs)" in result.output


def test_the_quota_example_has_the_dev_clusters_teams_and_limits():
    """slurm/dev/up.sh makes the accounts (`ensure_account NAME gres/gpu=N`); the example has the same teams,
    with the same GPU limits, and ops (unlimited there) at the cluster's 8 GPUs."""
    up = (REPO / "slurm" / "dev" / "up.sh").read_text()
    accounts = dict(re.findall(r"^\s*ensure_account (\w+) \"?([^\"\n]*)\"?$", up, re.M))
    assert set(accounts) == {"nlp", "vision", "ops"}
    policy = load_policy(REPO / "examples" / "quota.yaml")
    assert set(policy.teams) == set(accounts)
    for team, limit in accounts.items():
        if limit:
            assert f"gres/gpu={policy.teams[team].gpus}" == limit, team
        else:
            assert policy.teams[team].gpus == policy.cluster_gpus == 8
    assert "examples/quota.yaml" in (REPO / "README.md").read_text()


def test_a_broken_policy_is_reported_with_its_line(tmp_path):
    bad = tmp_path / "quota.yaml"
    bad.write_text("teams:\n  nlp:\n    gpus: four\n")
    result = CliRunner().invoke(cli, ["validate", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:3" in result.output and "teams.nlp.gpus" in result.output


def test_export_without_a_flag_lists_the_flags(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path)])
    assert result.exit_code == 2
    assert "nothing to export" in result.output and "--onnx" in result.output and "--quantize int8" in result.output
    result = CliRunner().invoke(cli, ["export", str(tmp_path), "--quantize", "int8"])
    assert result.exit_code == 2 and "--onnx is missing" in result.output
