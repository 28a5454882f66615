"""Paths in containers (launcher/paths.py): every path a job reads or writes must be one its container sees.

Slurm with a container runtime: relative paths resolve against the submit directory when the spec is loaded,
then must lie under the profile's shared_root (or a slurm.container_mounts destination). Slurm without a
container and the local backend: any path. Kubernetes: see tests/test_k8s_render.py (relative paths refused,
absolute ones under k8s.mount_path).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launcher.backends.local import LocalBackend
from launcher.backends.slurm import SlurmBackend
from launcher.backends.slurm_render import SCRIPT_FILE
from launcher.cli import cli
from launcher.errors import UsageError
from launcher.loading import load_spec
from launcher.paths import JobPath, check_slurm, is_under, job_paths, mount_destinations, resolve_paths
from launcher.profile import Profile
from launcher.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
IMAGE = "ghcr.io/mbl-project/mbl-trainer:0.1.0"


def slurm(runtime: str = "pyxis", shared_root: str = "/shared") -> SlurmBackend:
    backend = SlurmBackend()
    backend._profile = Profile.model_validate({"slurm": {"container_runtime": runtime, "shared_root": shared_root}})
    return backend


def tiny(name: str, base: str | None, *sets: str) -> JobSpec:
    """An example with an image, resolved against `base` as the CLI resolves it against the submit directory
    (None: not resolved at all, as a caller of the Python API may pass it)."""
    spec = load_spec(EXAMPLES / f"{name}.yaml", [f"image={IMAGE}", *sets])
    return spec.resolved(Path(base)) if base else spec


# ---- the pieces -------------------------------------------------------------------------------------


def test_every_path_field_is_found() -> None:
    spec = load_spec(EXAMPLES / "finetune-tiny.yaml", ["data.tokenizer=tok", "data.prepared=prep"])
    fields = {p.field: p.value for p in job_paths(spec)}
    assert fields == {
        "data.train[0]": "examples/data/sentiment-train.jsonl",
        "data.validation[0]": "examples/data/sentiment-validation.jsonl",
        "data.test[0]": "examples/data/sentiment-test.jsonl",
        "data.prepared": "prep", "data.tokenizer": "tok", "model.init_from": "runs/tiny-pretrain",
        "checkpoint.dir": "runs/tiny-finetune",
    }


@pytest.mark.parametrize("value,checked", [
    ("/shared/data/*.txt", "/shared/data"), ("/shared/*/train.jsonl", "/shared"), ("/shared/a[12]/x", "/shared"),
    ("data/part-?.txt", "data"), ("*.txt", "."), ("/shared/data/corpus.txt", "/shared/data/corpus.txt"),
])
def test_glob_patterns_are_checked_by_their_directory(value: str, checked: str) -> None:
    assert JobPath("data.train[0]", value).checked == checked


def test_under_is_lexical_and_folds_dotdot() -> None:
    assert is_under("/shared/data/x", "/shared") and is_under("/shared", "/shared/")
    assert not is_under("/shared/../etc/passwd", "/shared") and not is_under("/shared-other/x", "/shared")
    assert is_under("/anything", "/")


def test_resolve_paths_makes_relative_paths_absolute_against_the_submit_directory() -> None:
    data = load_spec(EXAMPLES / "finetune-tiny.yaml", ["data.train=[data/*.jsonl, /abs/../x.jsonl, ../up.jsonl]",
                                                      "data.tokenizer=./tok"]).model_dump(mode="json")
    out = resolve_paths(data, "/shared/work")
    assert out["data"]["train"] == ["/shared/work/data/*.jsonl", "/abs/../x.jsonl", "/shared/up.jsonl"]  # absolute: as written
    assert out["data"]["tokenizer"] == "/shared/work/tok"
    assert out["model"]["init_from"] == "/shared/work/runs/tiny-pretrain"
    assert out["checkpoint"] == data["checkpoint"]  # JobSpec.resolved's business
    assert data["data"]["train"][0] == "data/*.jsonl"  # the input is not changed


def test_resolved_spec_has_absolute_paths() -> None:
    spec = tiny("finetune-tiny", "/shared/work")
    assert spec.data.train == ["/shared/work/examples/data/sentiment-train.jsonl"]
    assert spec.model.init_from == "/shared/work/runs/tiny-pretrain"
    assert spec.run_dir == "/shared/work/runs/tiny-finetune"
    assert spec.resolved(Path("/elsewhere")) == spec  # resolving again changes nothing


def test_mount_destinations() -> None:
    assert mount_destinations(["/datasets", "/gpfs/ds:/data:ro", "/a:/b", "relative:x"]) == ["/datasets", "/data", "/b"]


# ---- Slurm with a container runtime -----------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
@pytest.mark.parametrize("name", ["pretrain-tiny", "finetune-tiny", "prepare-tiny"])
def test_relative_paths_under_the_shared_root_pass(name: str, runtime: str) -> None:
    """Submitted from /shared/work: the tiny examples' relative paths resolve onto the shared storage, and the
    spec the job reads holds them absolute."""
    request = slurm(runtime).dryrun(tiny(name, "/shared/work"))
    written = JobSpec.model_validate(yaml.safe_load(request.files["spec.yaml"]))
    for path in job_paths(written):
        assert path.is_absolute and is_under(path.checked, "/shared/work"), path


def test_relative_paths_from_outside_the_shared_root_are_refused() -> None:
    spec = tiny("pretrain-tiny", "/home/me/proj", "checkpoint.dir=/shared/runs/{name}")
    with pytest.raises(UsageError) as info:
        slurm("pyxis").dryrun(spec)
    message, hint = str(info.value), info.value.hint or ""
    assert "data.train[0] is '/home/me/proj/examples/data/corpus.txt'" in message
    assert "not under the shared storage /shared mounted into the pyxis container" in message
    assert "put it under /shared" in hint and "slurm.container_mounts" in hint
    assert info.value.exit_code == 2


def test_an_unresolved_relative_path_says_where_it_resolves() -> None:
    """A spec that was not resolved (the Python API): the check resolves against the submit directory."""
    spec = tiny("pretrain-tiny", None, "checkpoint.dir=/shared/runs/{name}")
    with pytest.raises(UsageError, match="resolves against the submit directory /home/me to "
                                         "'/home/me/examples/data/corpus.txt'"):
        check_slurm(spec, "/shared", "pyxis", base="/home/me")
    check_slurm(spec, "/shared", "pyxis", base="/shared/me")  # from the shared storage it is fine


@pytest.mark.parametrize("sets,shown", [
    (["data.prepared=/data/web"], "data.prepared is '/data/web'"),
    (["data.tokenizer=/home/me/tok"], "data.tokenizer is '/home/me/tok'"),
    (["model.init_from=/opt/models/base"], "model.init_from is '/opt/models/base'"),
    (["data.train=[/shared/data/a.txt, /data/*/b.txt]"], "data.train[1] is '/data/*/b.txt' (a pattern, "
                                                         "checked by its directory '/data')"),
    (["data.train=[/shared/../etc/corpus.txt]"], "data.train[0] is '/shared/../etc/corpus.txt'"),
    (["data.train=[/home/me/sst-saved-with-save_to_disk]"], "data.train[0] is '/home/me/sst-saved-with-save_to_disk'"),
])
def test_absolute_paths_outside_the_shared_root_are_refused(sets: list[str], shown: str) -> None:
    spec = tiny("pretrain-tiny", "/shared/work", *sets)
    with pytest.raises(UsageError, match="not under the shared storage /shared") as info:
        slurm("apptainer").dryrun(spec)
    assert shown in str(info.value)


def test_globs_and_container_mounts_pass() -> None:
    spec = tiny("pretrain-tiny", "/shared/work", "data.train=[/shared/data/*.txt, /datasets/web/*/part-*.txt]",
                "data.tokenizer=/data/tok", "slurm.container_mounts=[/datasets:/datasets:ro, /gpfs/tok:/data]")
    assert SCRIPT_FILE in slurm("pyxis").dryrun(spec).files
    with pytest.raises(UsageError, match="data.tokenizer is '/gpfs/tok/x'"):
        slurm("pyxis").dryrun(spec.model_copy(update={"data": spec.data.model_copy(update={"tokenizer": "/gpfs/tok/x"})}))


def test_every_bad_path_is_named_at_once() -> None:
    spec = tiny("finetune-tiny", "/home/me")
    with pytest.raises(UsageError, match="5 paths of the spec are not visible in the pyxis container") as info:
        slurm("pyxis", shared_root="/home/me/shared").dryrun(spec)
    for field in ("data.train[0]", "data.validation[0]", "data.test[0]", "model.init_from", "the run directory"):
        assert field in str(info.value)


# ---- no container, local ----------------------------------------------------------------------------


def test_slurm_without_a_container_takes_any_path() -> None:
    spec = tiny("finetune-tiny", "/home/me", "data.tokenizer=/opt/tok")
    assert SCRIPT_FILE in slurm("none").dryrun(spec).files
    with pytest.raises(UsageError, match="data.tokenizer is '/opt/tok'"):
        slurm("pyxis", shared_root="/home").dryrun(spec)


def test_local_backend_keeps_relative_paths_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    unresolved = load_spec(EXAMPLES / "pretrain-tiny.yaml", ["checkpoint.dir=" + str(tmp_path / "runs/{name}")])
    assert unresolved.data.train == ["examples/data/corpus.txt"]
    LocalBackend().dryrun(unresolved)  # as written: the job starts in this directory
    resolved = unresolved.resolved()
    assert resolved.data.train == [f"{tmp_path}/examples/data/corpus.txt"]
    LocalBackend().dryrun(resolved)


# ---- through the CLI --------------------------------------------------------------------------------


def test_cli_resolves_against_the_submit_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mbl render --slurm` from a directory on the shared storage passes; from elsewhere it exits 2."""
    shared, home = tmp_path / "shared", tmp_path / "home"
    for folder in (shared / "proj", home):
        folder.mkdir(parents=True)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"slurm": {"container_runtime": "pyxis", "shared_root": str(shared)}}))
    args = ["render", "--slurm", "--profile", str(profile), str(EXAMPLES / "pretrain-tiny.yaml"), "--set",
            f"image={IMAGE}", "--set", f"checkpoint.dir={shared}/runs/{{name}}"]

    monkeypatch.chdir(shared / "proj")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    monkeypatch.chdir(home)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"data.train[0] is '{home}/examples/data/corpus.txt'" in result.output
    assert "fix: put it under" in result.output
