"""Pipelines and sweeps (launcher/pipeline.py, sweep.py, pipeline_run.py, results.py): validation before
anything runs, stable run directories per sweep point, skipping finished points, the results table, and one
real pipeline on the local backend (a tiny pre-train, then a fine-tune over a 2-point sweep)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launcher.backends.base import JobRef, JobState, JobStatus, Request
from launcher.cli import cli
from launcher.errors import SpecError
from launcher.pipeline import describe, load_pipeline
from launcher.pipeline_run import run_local
from launcher.quota import QuotaPolicy, Usage, check_job
from launcher.results import print_tables, results, to_csv
from launcher.spec import DNS_1035, NAME_MAX_LEN
from launcher.sweep import grid_points, job_name, labels

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "examples" / "pretrain-tiny.yaml")
FINETUNE = str(REPO / "examples" / "finetune-tiny.yaml")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the example specs' data paths are relative to the repository


def write(tmp_path: Path, doc: dict | str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def two_stage(tmp_path: Path, grid: dict | None = None, **stage) -> dict:
    finetune = {"spec": FINETUNE, "set": {"model.init_from": "${stages.pretrain.model}"},
                "sweep": {"grid": grid or {"train.lr": [1.0e-3, 3.0e-5], "train.seed": [0, 1]}, "max_parallel": 2}}
    finetune.update(stage)
    return {"kind": "pipeline", "name": "pl", "runs_dir": str(tmp_path / "runs"),
            "stages": {"pretrain": {"spec": PRETRAIN}, "classify": finetune}}


def problems(path: Path) -> str:
    return problems_of(path, [])


def problems_of(path: Path, sets: list[str]) -> str:
    with pytest.raises(SpecError) as info:
        load_pipeline(path, sets)
    return info.value.render()


# ---- the plan ------------------------------------------------------------------------------------------


def test_plan_order_points_names_and_references(tmp_path):
    pipe = load_pipeline(write(tmp_path, two_stage(tmp_path)))
    assert [s.name for s in pipe.stages] == ["pretrain", "classify"]
    classify = pipe.stage("classify")
    assert classify.after == ["pretrain"]  # implied by the reference
    assert [p.label for p in classify.points] == ["lr0.001-seed0", "lr0.001-seed1", "lr3e-5-seed0", "lr3e-5-seed1"]
    assert [p.overrides for p in classify.points][2] == {"train.lr": 3.0e-5, "train.seed": 0}
    point = classify.points[2]
    assert point.spec.train.lr == 3.0e-5 and point.spec.train.seed == 0
    assert point.run_dir == str(tmp_path / "runs" / "classify-lr3e-5-seed0")
    assert point.name == "pl-classify-lr3e-5-seed0" and DNS_1035.match(point.name)
    assert point.spec.model.init_from == str(tmp_path / "runs" / "pretrain" / "final")
    assert pipe.stage("pretrain").points[0].run_dir == str(tmp_path / "runs" / "pretrain")
    text = "\n".join(describe(pipe))
    assert "classify: finetune, after pretrain, sweep of 4 point(s), 2 at a time" in text


def test_run_dirs_are_stable_and_readable(tmp_path):
    first = [p.run_dir for p in load_pipeline(write(tmp_path, two_stage(tmp_path))).points]
    assert first == [p.run_dir for p in load_pipeline(write(tmp_path, two_stage(tmp_path))).points]
    # the order of the grid's keys changes the index order, not the names
    swapped = two_stage(tmp_path, grid={"train.seed": [0, 1], "train.lr": [1.0e-3, 3.0e-5]})
    again = [p.run_dir for p in load_pipeline(write(tmp_path, swapped)).points]
    assert sorted(again) == sorted(first) and again != first
    # a point enumerable by index (a Slurm array task id): the first key varies slowest
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                            {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


def test_labels_and_job_names_stay_short_valid_and_distinct():
    long = [{"data.train": [f"/shared/data/very/long/path/number/{i}/train-{'x' * 40}.jsonl"]} for i in range(3)]
    got = labels(long)
    assert len(set(got)) == 3 and all(len(x) <= 64 and "/" not in x for x in got)
    assert got == labels(long)  # stable
    assert labels([{"a.b": "x/y"}, {"a.b": "x_y"}])[0] != labels([{"a.b": "x/y"}, {"a.b": "x_y"}])[1]
    assert labels([{"train.global_batch_size": 64, "train.warmup_steps": 10}]) == ["gbs64-warmup10"]
    name = job_name("a-pipeline-name-of-thirty-char", "finetune-stage", got[0])
    assert len(name) <= NAME_MAX_LEN and DNS_1035.match(name)
    assert name == job_name("a-pipeline-name-of-thirty-char", "finetune-stage", got[0])
    assert name != job_name("a-pipeline-name-of-thirty-char", "finetune-stage", got[1])


def test_explicit_points_and_inline_spec(tmp_path):
    doc = {"kind": "pipeline", "name": "pl", "runs_dir": str(tmp_path / "r"), "stages": {
        "pre": {"spec": yaml.safe_load(Path(PRETRAIN).read_text()),
                "sweep": {"points": [{"train.max_steps": 60}, {"train.max_steps": 80, "train.lr": 0.001}]}}}}
    pipe = load_pipeline(write(tmp_path, doc))
    assert [p.label for p in pipe.points] == ["steps60", "lr0.001-steps80"]
    assert pipe.points[1].spec.train.max_steps == 80


# ---- validation: everything before anything runs ---------------------------------------------------------


def test_a_cycle_is_named(tmp_path):
    doc = two_stage(tmp_path)
    doc["stages"]["pretrain"]["after"] = ["classify"]
    text = problems(write(tmp_path, doc))
    assert "cycle" in text and ("pretrain -> classify -> pretrain" in text or "classify -> pretrain -> classify" in text)
    assert re.search(r"pipe\.yaml:\d+: stages\.\w+\.after", text), text


def test_unknown_stages_in_after_and_references(tmp_path):
    doc = two_stage(tmp_path, after=["pretrian"])
    doc["stages"]["classify"]["set"]["model.init_from"] = "${stages.pretrain-x.model}"
    text = problems(write(tmp_path, doc))
    assert "stages.classify.after.0: unknown stage 'pretrian'; stages: pretrain, classify" in text
    assert "${stages.pretrain-x.model} refers to an unknown stage 'pretrain-x'" in text
    assert text.count("error: ") == 2
    doc = two_stage(tmp_path)
    doc["stages"]["classify"]["set"]["model.init_from"] = "${stages.pretrain.weights}"
    assert "${stages.pretrain.model} (its final model folder" in problems(write(tmp_path, doc))


def test_a_sweep_key_that_is_no_spec_field(tmp_path):
    path = write(tmp_path, two_stage(tmp_path, grid={"train.learning_rate": [1.0e-3], "train.seed": [0]}))
    text = problems(path)
    line = next(i for i, x in enumerate(path.read_text().splitlines(), 1) if "train.learning_rate" in x)
    assert f"{path}:{line}: stages.classify.sweep.grid.'train.learning_rate': unknown key `learning_rate`" in text
    assert "unknown key `learning_rate`" in text and "allowed here:" in text
    owned = problems(write(tmp_path, two_stage(tmp_path, grid={"checkpoint.dir": ["/tmp/a", "/tmp/b"]})))
    assert "the pipeline names each job and its run directory" in owned and "runs_dir" in owned


def test_a_sweep_point_that_breaks_batch_arithmetic(tmp_path):
    """micro batch 12 on 2 ranks does not divide the global batch of 32: the points with it are named."""
    path = write(tmp_path, two_stage(tmp_path, grid={"train.micro_batch_size": [16, 12], "train.seed": [0, 1]}))
    text = problems(path)
    assert "train.global_batch_size (32) must be a multiple of train.micro_batch_size (12)" in text
    assert "[stage classify, sweep point 2 (mbs12-seed0), 3 (mbs12-seed1)]" in text
    assert text.count("error: ") == 1 and "mbs16" not in text


def test_the_pipelines_own_fields_are_checked_with_lines(tmp_path):
    path = write(tmp_path, "kind: pipeline\nname: Bad_Name\nstages:\n  a:\n    spec: x.yaml\n    aftr: []\n"
                           "    sweep: {grid: {train.lr: []}}\n")
    text = problems(path)
    assert f"{path}:2: name: must be a DNS-1035 label" in text
    assert f"{path}:6: stages.a.aftr: unknown key `aftr`; did you mean `after`?" in text
    assert "sweep.grid.train.lr is an empty list" in text
    missing = write(tmp_path, "kind: pipeline\nname: p\nstages:\n  a:\n    spec: nowhere.yaml\n")
    text = problems(missing)
    assert f"{missing}:5: stages.a.spec: " in text and "cannot read the spec" in text


def test_cli_validate_and_dry_run(tmp_path):
    good = write(tmp_path, two_stage(tmp_path))
    result = CliRunner().invoke(cli, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "pipeline 'pl', 5 job(s): pretrain, classify (4)" in result.output
    dry = CliRunner().invoke(cli, ["submit", "--dry-run", str(good)])
    assert dry.exit_code == 0 and "classify-lr3e-5-seed1" in dry.output
    assert not (tmp_path / "runs").exists()
    bad = write(tmp_path, two_stage(tmp_path, after=["nope"]), "bad.yaml")
    result = CliRunner().invoke(cli, ["submit", str(bad)])
    assert result.exit_code == 2 and "unknown stage 'nope'" in result.output
    k8s = CliRunner().invoke(cli, ["submit", "--k8s", str(good)])  # tests/test_pipeline_{slurm,k8s}.py
    assert k8s.exit_code == 2 and "Kubernetes runs a container image" in k8s.output
    big = CliRunner().invoke(cli, ["submit", "--dry-run", str(REPO / "examples" / "pipeline.yaml")])
    assert big.exit_code == 2 and "stage pretrain: the local backend runs one node" in big.output


def test_schema_of_a_pipeline_accepts_the_examples():
    import jsonschema

    result = CliRunner().invoke(cli, ["schema", "--pipeline"])
    schema = json.loads(result.output)
    assert schema["properties"]["kind"]["const"] == "pipeline"
    assert {"spec", "set", "after", "sweep"} <= set(schema["$defs"]["StageSpec"]["properties"])
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in ("pipeline-tiny.yaml", "pipeline.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load((REPO / "examples" / name).read_text()))), name
    assert list(validator.iter_errors({"kind": "pipeline", "name": "p", "stages": {"a": {"spec": "x", "aftr": []}}}))


def test_quota_counts_a_sweep_as_max_parallel_jobs(tmp_path):
    spec = load_pipeline(write(tmp_path, two_stage(tmp_path))).stage("classify").points[0].spec
    policy = QuotaPolicy.model_validate({"teams": {"default": {"gpus": 4}}})
    assert check_job(spec, policy, Usage("default"), count=2) == []  # 2 jobs x 2 ranks
    (why,) = check_job(spec, policy, Usage("default"), count=3)
    assert "the sweep asks 6 GPUs (3 jobs at once x 2)" in why and "lower max_parallel" in why


# ---- running: finished points are skipped, a failed stage stops its dependants ---------------------------


def summary(run_dir: Path, kind: str = "finetune", value: float = 0.8, test: float = 0.75,
            baseline: float = 0.5) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"kind": kind, "final_dir": str(run_dir / "final"), "steps": 10}
    if kind == "finetune":
        data.update(task="classification", best_step=10, best_validation_accuracy=value,
                    test={"accuracy": test, "f1": test}, test_baseline={"accuracy": baseline, "f1": 0.3})
    else:
        data.update(heldout_loss=value, perplexity=2.0)
    (run_dir / "summary.json").write_text(json.dumps(data))
    (run_dir / "DONE").write_text("")


class FakeBackend:
    """Stands in for the local backend: records what is submitted; a job ends at once, failing when its run
    directory's name is in `fail` (its status as the local backend reports a failed job)."""

    name = "local"

    def __init__(self, fail=()):
        self.fail, self.submitted = set(fail), []

    def dryrun(self, spec):
        return Request("local", spec, ["true"])

    def submit(self, request):
        spec = request.spec
        self.submitted.append(Path(spec.run_dir).name)
        if Path(spec.run_dir).name not in self.fail:
            summary(Path(spec.run_dir), kind=spec.kind)
        return JobRef("local", f"local-{len(self.submitted)}", spec.name, spec.run_dir, {"rc": "/nonexistent"})

    def status(self, ref):
        if Path(ref.run_dir).name in self.fail:
            return JobStatus(JobState.FAILED, reason="failed for good: bad input", detail="exit code 1")
        return JobStatus(JobState.COMPLETED)


def test_finished_points_are_skipped_and_a_failed_stage_stops_its_dependants(tmp_path, monkeypatch):
    from launcher import pipeline_run
    from launcher.registry import Registry

    monkeypatch.setattr(pipeline_run, "POLL_SECONDS", 0.0)
    doc = two_stage(tmp_path)
    doc["stages"]["export"] = {"spec": FINETUNE, "after": ["classify"],
                               "set": {"model.init_from": "${stages.pretrain.model}"}}
    pipe = load_pipeline(write(tmp_path, doc))
    runs = tmp_path / "runs"
    summary(runs / "pretrain", kind="pretrain", value=3.0)
    summary(runs / "classify-lr0.001-seed1")
    lines: list[str] = []
    backend = FakeBackend(fail={"classify-lr3e-5-seed0"})
    rc = run_local(pipe, Registry(tmp_path / "reg.db"), backend, lines.append)
    assert rc == 1
    assert backend.submitted == ["classify-lr0.001-seed0", "classify-lr3e-5-seed0", "classify-lr3e-5-seed1"]
    text = "\n".join(lines)
    assert "pretrain: finished before, skipped (held-out loss 3.000)" in text
    assert "classify[1] lr0.001-seed1: finished before, skipped" in text
    assert "classify[2] lr3e-5-seed0: FAILED after" in text and "bad input" in text
    assert "export: not run: it needs classify (failed)" in text
    assert "pipeline pl: FAILED" in text
    # the second submission starts only what is not finished
    backend = FakeBackend()
    assert run_local(pipe, Registry(tmp_path / "reg.db"), backend, lines.append) == 0
    assert backend.submitted == ["classify-lr3e-5-seed0", "export"]


# ---- results ----------------------------------------------------------------------------------------------


def test_results_best_point_mean_std_json_and_csv(tmp_path):
    pipe = load_pipeline(write(tmp_path, two_stage(tmp_path)))
    runs = tmp_path / "runs"
    summary(runs / "pretrain", kind="pretrain", value=3.25)
    summary(runs / "classify-lr0.001-seed0", value=0.80, test=0.78)
    summary(runs / "classify-lr0.001-seed1", value=0.90, test=0.86)
    summary(runs / "classify-lr3e-5-seed0", value=0.60, test=0.55)
    # lr3e-5-seed1 has not finished
    data = results(pipe)
    classify = data["stages"][1]
    assert classify["metric"] == "accuracy" and classify["greater_is_better"] and classify["split"] == "validation"
    assert classify["best"]["point"] == "lr0.001-seed1" and classify["best"]["test"] == 0.86
    assert classify["best"]["model"] == str(runs / "classify-lr0.001-seed1" / "final")
    (lr1, lr2) = classify["configs"]
    assert lr1["overrides"] == {"train.lr": 0.001} and lr1["n"] == 2
    assert lr1["mean"] == pytest.approx(0.85) and lr1["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert lr2["n"] == 1 and lr2["mean"] == pytest.approx(0.60) and lr2["std"] is None
    assert data["stages"][0]["best"]["value"] == 3.25 and not data["stages"][0]["greater_is_better"]

    rows = to_csv(data).splitlines()
    assert rows[0].startswith("stage,index,point,name,finished,metric,split,value,test,baseline,best,model")
    assert any(r.startswith("classify,1,lr0.001-seed1,pl-classify-lr0p001-seed1,True,accuracy,validation,0.9,0.86,"
                            "0.5,True,") for r in rows), rows
    assert any(r.startswith("classify,3,lr3e-5-seed1,") and ",False," in r for r in rows)

    from rich.console import Console

    console = Console(width=200, record=True)
    print_tables(data, console)
    text = console.export_text()
    assert "classify: classification, 3/4 finished; best by validation accuracy (higher is better)" in text
    assert "0.8500 ± 0.07071" in text and "not finished" in text
    assert f"best: lr0.001-seed1 (validation accuracy 0.9000, test 0.8600 vs trivial baseline 0.5000); model: " \
           f"{runs / 'classify-lr0.001-seed1' / 'final'}" in text

    result = CliRunner().invoke(cli, ["results", str(tmp_path / "pipe.yaml"), "-o", "json"])
    assert result.exit_code == 0 and json.loads(result.output)["stages"][1]["best"]["point"] == "lr0.001-seed1"
    assert "best: lr0.001-seed1" in CliRunner().invoke(cli, ["results", str(tmp_path / "pipe.yaml")]).output


def test_plot_compares_the_points_of_a_stage(tmp_path, monkeypatch):
    from test_plot import make_run, png_size

    import launcher.plot

    write(tmp_path, two_stage(tmp_path))
    runs = tmp_path / "runs"
    make_run(runs / "pretrain", "pl-pretrain", "pretrain", 50)
    make_run(runs / "classify-lr0.001-seed0", "pl-classify-lr0p001-seed0", "finetune", 50)
    make_run(runs / "classify-lr3e-5-seed1", "pl-classify-lr3e-5-seed1", "finetune", 50)  # two points not run yet
    pipe = str(tmp_path / "pipe.yaml")
    out = tmp_path / "classify.png"
    result = CliRunner().invoke(cli, ["plot", pipe, "--stage", "classify", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert png_size(out) == (1320, 880)

    seen = []
    monkeypatch.setattr(launcher.plot, "plot", lambda found, path: seen.append(found) or path)
    assert CliRunner().invoke(cli, ["plot", pipe, "-o", str(out)]).exit_code == 0
    assert seen[-1] == [("pretrain", runs / "pretrain"), ("classify lr0.001-seed0", runs / "classify-lr0.001-seed0"),
                        ("classify lr3e-5-seed1", runs / "classify-lr3e-5-seed1")]
    bad = CliRunner().invoke(cli, ["plot", pipe, "--stage", "clasify"])
    assert bad.exit_code == 2 and "has no such stage" in bad.output and "pretrain, classify" in bad.output
    (runs / "pretrain" / "metrics.jsonl").unlink()
    none = CliRunner().invoke(cli, ["plot", pipe, "--stage", "pretrain"])
    assert none.exit_code == 2 and "no point of pretrain has logged steps yet" in none.output


def test_every_example_pipeline_validates():
    for name in ("pipeline-tiny.yaml", "pipeline.yaml"):
        pipe = load_pipeline(REPO / "examples" / name)
        kinds = {s.points[0].spec.task.type for s in pipe.stages if s.points[0].spec.task}
        assert kinds == {"classification", "token-classification", "question-answering"}, name


# ---- the real thing ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_pipeline_end_to_end(tmp_path, mbl_env):
    """A tiny pre-train, then a classification fine-tune over 2 learning rates, on the local backend; the best
    point beats the majority class. Submitting again skips both stages."""
    doc = {"kind": "pipeline", "name": "e2e", "runs_dir": str(tmp_path / "runs"), "stages": {
        "pretrain": {"spec": PRETRAIN, "set": {"train.max_steps": 40, "train.eval_every_steps": 40,
                                               "checkpoint.every_steps": 40}},
        "classify": {"spec": FINETUNE, "set": {"model.init_from": "${stages.pretrain.model}", "train.epochs": 1,
                                               "data.max_length": 48},
                     "sweep": {"grid": {"train.lr": [1.0e-3, 3.0e-3]}, "max_parallel": 1}}}}
    path = write(tmp_path, doc)
    mbl = [sys.executable, "-m", "launcher.cli"]
    start = time.monotonic()
    run = subprocess.run([*mbl, "submit", str(path)], cwd=REPO, env=mbl_env, capture_output=True, text=True,
                         timeout=900)
    took = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "classify[1] lr0.003: COMPLETED" in run.stderr and "pipeline e2e: COMPLETED" in run.stderr
    out = subprocess.run([*mbl, "results", str(path), "-o", "json"], cwd=REPO, env=mbl_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    classify = json.loads(out.stdout)["stages"][1]
    best = classify["best"]
    assert classify["finished"] == 2 and best is not None
    assert best["test"] > best["baseline"], classify  # better than the majority class
    assert Path(best["model"], "config.json").exists()
    again = subprocess.run([*mbl, "submit", str(path)], cwd=REPO, env=mbl_env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stderr.count("finished before, skipped") == 3, again.stderr
    print(f"pipeline took {took:.0f}s")


def test_every_run_directory_is_checked_before_anything_runs(tmp_path):
    """A point's run directory holding another job (here: a since changed learning rate) is refused before any
    point starts, finished or not, as `mbl submit` refuses one job."""
    from launcher.backends import get_backend
    from launcher.errors import UsageError
    from launcher.pipeline_run import check_points
    from launcher.registry import Registry
    from launcher.rundir import write_spec

    pipe = load_pipeline(write(tmp_path, two_stage(tmp_path)))
    check_points(pipe, Registry(tmp_path / "reg.db"), get_backend)  # nothing there yet: fine
    point = pipe.stage("classify").points[3]
    write_spec(point.spec.model_copy(update={"train": point.spec.train.model_copy(update={"lr": 0.5})}))
    summary(Path(point.run_dir))
    with pytest.raises(UsageError, match="already holds a different job .changed: train.lr"):
        check_points(pipe, Registry(tmp_path / "reg.db"), get_backend)


@pytest.mark.parametrize("text, expected", [
    ("kind: pipeline\nname: p\nstages: {}\n", "at least one stage"),
    ("kind: pipeline\nname: p\nstages: [a, b]\n", "stages: Input should be a valid dictionary"),
    ("kind: pipeline\nname: p\nstages:\n  a: {spec: [x]}\n", "stages.a.spec"),
    ("kind: pipeline\nname: p\nstages:\n  A_b: {spec: x.yaml}\n", "stage name 'A_b'"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}, set: {{train: 5}}, sweep: {{grid: {{train.lr: [1]}}}}}}\n",
     "train is a value, not a section"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}, sweep: {{grid: {{train.seed: [2020-01-01]}}}}}}\n",
     "train.seed: Input should be a valid integer"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}}}\n  b: {{spec: {FINETUNE}, set: "
     "{model.init_from: '${stages.a}'}}\n", "a stage offers"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}, sweep: {{grid: {{train.seed: [1, 2]}}}}}}\n"
     f"  b: {{spec: {FINETUNE}, set: {{model.init_from: '${{stages.a.model}}'}}}}\n", "stage a is a sweep of 2 points"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}, set: {{name: x}}}}\n", "the pipeline names each job"),
    (f"kind: pipeline\nname: p\nstages:\n  a: {{spec: {PRETRAIN}, sweep: {{grid: {{train.lr: [1, 1]}}}}}}\n",
     "repeats a value"),
])
def test_bad_pipelines_exit_2_with_a_message(tmp_path, text, expected):
    path = write(tmp_path, text)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert expected in result.output and str(path) in result.output, result.output
    assert "Traceback" not in result.output


def test_pipeline_commands_never_import_heavy_packages(mbl_env, tmp_path):
    code = (
        "import sys; from launcher.cli import cli\n"
        "from click.testing import CliRunner\n"
        "for args in (['validate'], ['render'], ['results'], ['results', '-o', 'csv']):\n"
        "    r = CliRunner().invoke(cli, [*args, 'examples/pipeline-tiny.yaml'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets', 'kubernetes') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    env = {**mbl_env, "MBL_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_command_line_sets_apply_to_every_job(tmp_path):
    pipe = load_pipeline(write(tmp_path, two_stage(tmp_path)), ["train.warmup_steps=3"])
    assert {p.spec.train.warmup_steps for p in pipe.points} == {3}
    assert [p.run_dir for p in pipe.points] == [p.run_dir for p in load_pipeline(tmp_path / "pipe.yaml").points]
    text = problems_of(tmp_path / "pipe.yaml", ["train.warmup_steps=x"])
    assert "error: --set train.warmup_steps=x: train.warmup_steps: Input should be a valid integer" in text
    assert "[stage pretrain]" in text and "[stage classify, every sweep point]" in text
    assert text.count("error: ") == 2  # not also the reference to the broken stage


def test_ctrl_c_cancels_the_running_points_and_returns_130(tmp_path, monkeypatch):
    from launcher import pipeline_run
    from launcher.registry import Registry

    monkeypatch.setattr(pipeline_run, "POLL_SECONDS", 0.0)

    class Interrupted(FakeBackend):
        def __init__(self):
            super().__init__()
            self.cancelled, self.waited = [], []

        def submit(self, request):  # starts, never finishes by itself
            self.submitted.append(Path(request.spec.run_dir).name)
            return JobRef("local", "local-1", request.spec.name, request.spec.run_dir, {"rc": "/nonexistent"})

        def status(self, ref):
            if len(self.submitted) == 2:
                raise KeyboardInterrupt
            return JobStatus(JobState.RUNNING)

        def cancel(self, ref):
            self.cancelled.append(Path(ref.run_dir).name)
            return True

        def wait(self, ref, timeout=None):
            self.waited.append(timeout)
            return 143

    pipe = load_pipeline(write(tmp_path, two_stage(tmp_path)))
    summary(tmp_path / "runs" / "pretrain", kind="pretrain")
    backend, lines = Interrupted(), []
    assert run_local(pipe, Registry(tmp_path / "reg.db"), backend, lines.append) == 130
    assert backend.cancelled == ["classify-lr0.001-seed0", "classify-lr0.001-seed1"]  # max_parallel 2
    assert len(backend.waited) == 2 and "submit the pipeline again to resume" in lines[-1]
