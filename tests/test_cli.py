"""Every command through Click's runner, plus the whole-process behaviour a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from example_files import JOB_SPECS
from golden_util import check_golden

from launcher.cli import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = JOB_SPECS
TINY = [p for p in EXAMPLES if p.stem.endswith("-tiny")]


def run(*args, cwd=REPO):
    runner = CliRunner()
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


BAD = """\
kind: pretrain
name: bad-job
data:
  train: [x.txt]
train:
  max_steps: ten
  lr_rate: 0.1
  global_batch_size: 30
  micro_batch_size: 4
distributed:
  gpus_per_node: 2
"""


def test_validate_examples_exit_zero():
    result = run("validate", *map(str, EXAMPLES))
    assert result.exit_code == 0, result.output
    assert result.output.count("ok: ") == len(EXAMPLES)


def test_validate_bad_spec_three_messages_no_traceback(tmp_path, mbl_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(bad)], capture_output=True,
                          text=True, env=mbl_env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0].startswith(f"error: {bad}:6: train.max_steps:")
    assert lines[1].startswith(f"error: {bad}:7: train.lr_rate: unknown key")
    assert lines[2].startswith(f"error: {bad}:8: train.global_batch_size:")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_debug_shows_the_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["--debug", "render", str(tmp_path / "missing.yaml")])
    assert result.exception is not None and result.exit_code != 0


@pytest.mark.parametrize("spec", TINY, ids=lambda p: p.stem)
def test_render_local_golden(spec):
    result = run("render", str(spec.relative_to(REPO)))
    assert result.exit_code == 0, result.output
    out = result.output.replace(str(REPO), "<repo>")
    check_golden(f"local/{spec.stem}.txt", out)


def test_render_local_prints_the_command_submit_runs():
    from launcher.backends.local import LocalBackend
    from launcher.loading import load_spec

    result = run("render", "examples/pretrain-tiny.yaml")
    first = result.output.splitlines()[0]
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        request = LocalBackend().dryrun(load_spec("examples/pretrain-tiny.yaml").resolved())
    finally:
        os.chdir(cwd)
    assert first == f"# local: {request.command_line()}"
    assert "python -m jobs.launch --spec " in first and " -- --standalone --nnodes=1 --nproc-per-node=2 " in first


def test_render_refuses_multi_node_locally():
    result = run("render", "examples/pretrain.yaml")
    assert result.exit_code == 2
    assert "distributed.nodes=1" in result.output


def test_render_output_dir(tmp_path):
    result = run("render", "examples/pretrain-tiny.yaml", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0
    written = yaml.safe_load((tmp_path / "out" / "spec.yaml").read_text())
    assert written["name"] == "tiny-pretrain" and Path(written["checkpoint"]["dir"]).is_absolute()


def test_submit_dry_run_writes_nothing(tmp_path):
    result = run("submit", "--dry-run", "--set", f"checkpoint.dir={tmp_path}/run", "examples/pretrain-tiny.yaml")
    assert result.exit_code == 0, result.output
    assert "jobs.launch" in result.output
    assert not (tmp_path / "run").exists()


def test_cluster_flags_conflict():
    result = run("render", "--cluster", "local", "--k8s", "examples/finetune.yaml")
    assert result.exit_code == 2 and "disagree" in result.output


def test_schema_is_draft_2020_12_and_accepts_every_example():
    result = run("schema")
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for spec in EXAMPLES:
        errors = list(validator.iter_errors(yaml.safe_load(spec.read_text())))
        assert not errors, (spec, errors[0].message)
    bad = {"kind": "pretrain", "name": "x", "train": {"max_stepz": 1}}
    assert list(validator.iter_errors(bad))


def test_status_logs_cancel_unknown_job_exit_2():
    for args in (["status", "nope"], ["logs", "nope"], ["cancel", "nope"]):
        result = run(*args)
        assert result.exit_code == 2, args
        assert "no job 'nope'" in result.output and "mbl list" in result.output


def test_list_empty_json():
    result = run("list", "-o", "json")
    assert result.exit_code == 0 and json.loads(result.output) == []


def test_completion_script():
    result = run("completion", "bash")
    assert result.exit_code == 0 and "_MBL_COMPLETE" in result.output


def test_help_has_examples():
    for command in ("submit", "render", "validate", "logs", "schema"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command


def test_launcher_never_imports_heavy_packages(mbl_env):
    code = (
        "import sys; from launcher.cli import cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(cli, ['render', 'examples/pretrain-tiny.yaml'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets', 'kubernetes') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=mbl_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_quota_commands_without_or_with_a_bad_policy(tmp_path):
    result = run("quota", "show", "--cluster", "k8s")
    assert result.exit_code == 2 and "needs the policy" in result.output
    bad = tmp_path / "policy.yaml"
    bad.write_text("teams:\n  NLP: {gpus: 4}\n")
    result = run("quota", "render", "--k8s", str(bad))
    assert result.exit_code == 2 and "DNS-1035" in result.output
    good = tmp_path / "good.yaml"
    good.write_text("teams:\n  nlp: {gpus: 4, max_gpus_per_job: 2}\n")
    result = run("quota", "apply", str(good))  # prints, runs nothing without --yes
    assert result.exit_code == 0
    assert "sacctmgr -i modify account where name=nlp set GrpTRES=gres/gpu=4 MaxTRESPerJob=gres/gpu=2" in result.output
    result = run("quota", "report", "--since", "yesterday")
    assert result.exit_code == 2 and "not a date" in result.output


def test_bad_namespace_option_is_a_clean_error():
    """-n is validated like k8s.namespace: exit 2 naming the option, never a pydantic traceback."""
    result = run("render", "--k8s", "examples/pretrain.yaml", "-n", "Bad_NS")
    assert result.exit_code == 2, result.output
    assert "-n/--namespace 'Bad_NS'" in result.output and "DNS label" in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    ok = run("render", "--k8s", "examples/pretrain.yaml", "-n", "research")
    assert ok.exit_code == 0 and "namespace: research" in ok.output
