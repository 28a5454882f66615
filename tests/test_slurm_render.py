"""The sbatch script: a golden file per example, structural asserts per container runtime x node count,
quoting, secrets.

Regenerate the golden files on purpose only: MBL_UPDATE_GOLDEN=1 pytest tests/test_slurm_render.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from example_files import JOB_SPECS
from golden_util import check_golden

from launcher.backends.slurm import SlurmBackend
from launcher.backends.slurm_render import SCRIPT_FILE, apptainer_image, pyxis_image, sbatch_options
from launcher.errors import UsageError
from launcher.loading import load_spec
from launcher.profile import Profile, SlurmProfile
from launcher.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "slurm"
EXAMPLES = JOB_SPECS
RUNTIMES = ["pyxis", "apptainer", "none"]
NODES = [1, 2, 16]
BASE = Path("/shared/work")  # relative checkpoint dirs resolve here, so the files do not depend on the CWD
IMAGE = "ghcr.io/mbl-project/mbl-trainer:0.1.0"

PROFILE = {
    "name": "golden",
    "slurm": {
        "version": "23.11",
        "partitions": [
            {"name": "gpu-h100", "gpu_types": ["h100"], "default": True},
            {"name": "gpu-a100", "gpu_types": ["a100"]},
        ],
        "default_qos": "normal",
        "container_runtime": "pyxis",
        "shared_root": "/shared",
        "setup": ["module load cuda/12.4", "source /shared/venvs/mbl/bin/activate"],
    },
}


def backend(**slurm: object) -> SlurmBackend:
    b = SlurmBackend()
    data = {**PROFILE, "slurm": {**PROFILE["slurm"], **slurm}}
    b._profile = Profile.model_validate(data)
    return b


def variant(path: Path, runtime: str, nodes: int, extra: list[str] | None = None) -> JobSpec:
    spec = load_spec(path, extra or [])
    per_step = spec.train.micro_batch_size * nodes * spec.distributed.gpus_per_node
    sets = [
        f"distributed.nodes={nodes}",
        f"train.global_batch_size={per_step * spec.grad_accum}",
        f"slurm.container_runtime={runtime}",
        *(extra or []),
    ]
    if not spec.image:
        sets.append(f"image={IMAGE}")
    return load_spec(path, sets).resolved(BASE)


def shell_checks(script: str, tmp_path: Path, exclude: str = "") -> None:
    path = tmp_path / SCRIPT_FILE
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "--shell=bash", *(["--exclude", exclude] if exclude else []), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_golden(example: Path, tmp_path: Path) -> None:
    """One golden file per example, as the example is (2 nodes, the profile's runtime pyxis)."""
    spec = variant(example, "pyxis", 2)
    script = backend().dryrun(spec).files[SCRIPT_FILE]
    check_golden(f"slurm/{example.stem}.sbatch", script)
    shell_checks(script, tmp_path)


CASES = [(e, r, n) for e in EXAMPLES for r in RUNTIMES for n in NODES]


@pytest.mark.parametrize("example,runtime,nodes", CASES,
                         ids=[f"{e.stem}-{r}-{n}n" for e, r, n in CASES])
def test_structure(example: Path, runtime: str, nodes: int, tmp_path: Path) -> None:
    spec = variant(example, runtime, nodes)
    request = backend().dryrun(spec)
    script = request.files[SCRIPT_FILE]
    shell_checks(script, tmp_path)
    opts = sbatch_options(spec, backend().profile.slurm)
    assert opts["nodes"] == str(nodes) and opts["ntasks-per-node"] == "1"
    assert f"#SBATCH --nodes={nodes}\n" in script
    assert f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1" in script
    assert f"--nnodes={nodes}" in script and "--rdzv-backend=c10d" in script
    assert "--kill-on-bad-exit=1" in script
    assert ("--container-image=" in script) == (runtime == "pyxis")
    assert ("apptainer exec --nv" in script) == (runtime == "apptainer")
    # the one launch command of every backend, with the spec's save window
    assert f"python -m jobs.launch --spec {spec.run_dir}/spec.yaml -- " in " ".join(
        line.strip().rstrip("\\").strip() for line in script.splitlines())
    assert f"--shutdown-timeout={spec.checkpoint.save_grace_seconds}" in script
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert request.command == ["sbatch", "--parsable", f"{spec.run_dir}/{SCRIPT_FILE}"]


def test_options_of_the_pretrain_example() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml").resolved(BASE)
    opts = sbatch_options(spec, backend().profile.slurm)
    assert opts["gpus-per-node"] == "8"
    assert opts["cpus-per-task"] == str(12 * 8)
    assert opts["mem"] == "960G" and opts["time"] == "2-00:00:00"
    assert opts["partition"] == "gpu-h100"  # from resources.gpu_type through the profile
    assert opts["account"] == "nlp"  # the team: neither the spec nor the profile names one
    assert opts["qos"] == "normal"
    assert opts["signal"] == "B:USR1@600"
    assert opts["open-mode"] == "append"
    assert "requeue" in opts and opts["requeue"] is None


def test_old_slurm_takes_gres() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml").resolved(BASE)
    opts = sbatch_options(spec, SlurmProfile(version="18.08", shared_root="/shared"))
    assert opts["gres"] == "gpu:8" and "gpus-per-node" not in opts


def test_account_precedence() -> None:
    path = ROOT / "examples" / "pretrain.yaml"
    spec = load_spec(path).resolved(BASE)
    assert sbatch_options(spec, backend(default_account="research").profile.slurm)["account"] == "research"
    spec = load_spec(path, ["slurm.account=special"]).resolved(BASE)
    assert sbatch_options(spec, backend(default_account="research").profile.slurm)["account"] == "special"


def test_every_value_is_quoted(tmp_path: Path) -> None:
    hostile = "a b;$(touch /tmp/pwned)'\"`x`"
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", [
        f"env.WEIRD={hostile}", f"slurm.constraint={hostile}", f"slurm.sbatch_args.mail-user={hostile}",
        "checkpoint.dir=/shared/runs with space/{name}", "slurm.container_mounts=[/data dir:/data]",
    ]).resolved(BASE)
    script = backend().dryrun(spec).files[SCRIPT_FILE]
    shell_checks(script, tmp_path, exclude="SC2016")  # SC2016: "$(...)" in single quotes, as intended here
    # Run the environment part of the script for real: the value must arrive intact, nothing executed.
    env_lines = [line for line in script.splitlines() if line.startswith("export WEIRD=")]
    proc = subprocess.run(["bash", "-c", env_lines[0] + '\nprintf %s "$WEIRD"'], capture_output=True, text=True)
    assert proc.stdout == hostile
    assert not Path("/tmp/pwned").exists()
    assert "#SBATCH --output='/shared/runs with space/mbert-base-pretrain/logs/slurm-%j.out'" in script
    assert "'--container-mounts=/shared:/shared,/data dir:/data'" in script


def test_secrets_are_never_inlined(tmp_path: Path) -> None:
    value = "s3cr3t-VALUE-never-in-a-script"
    secret = tmp_path / "api-key"
    secret.write_text(value)
    spec = load_spec(ROOT / "examples" / "pretrain.yaml",
                     [f"secrets.WANDB_API_KEY.file={secret}", "secrets.HF_TOKEN={file: ~/.hf-token}"]).resolved(BASE)
    request = backend().dryrun(spec)
    everything = str(request) + request.command_line() + "".join(request.files.values()) + repr(request.env)
    assert value not in everything
    script = request.files[SCRIPT_FILE]
    assert f'WANDB_API_KEY="$(cat {secret})"\nexport WANDB_API_KEY' in script
    assert 'HF_TOKEN="$(cat "${HOME}"/.hf-token)"' in script
    # ... and the script does read it at run time.
    lines = [x for x in script.splitlines() if "WANDB_API_KEY" in x and not x.startswith("#")]
    proc = subprocess.run(["bash", "-c", "\n".join(lines) + '\nprintf %s "$WANDB_API_KEY"'],
                          capture_output=True, text=True)
    assert proc.stdout == value


def test_kubernetes_only_secret_is_refused() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["secrets.WANDB_API_KEY.file=null"]).resolved(BASE)
    with pytest.raises(UsageError, match="read secrets from files"):
        backend().dryrun(spec)


def test_container_runtime_needs_image_and_shared_run_dir() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["image=null"]).resolved(BASE)
    with pytest.raises(UsageError, match="needs an image"):
        backend().dryrun(spec)
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["checkpoint.dir=/scratch/{name}"]).resolved(BASE)
    with pytest.raises(UsageError, match="not under the shared storage"):
        backend().dryrun(spec)
    backend(container_runtime="none").dryrun(spec)  # no container: no mount needed


def test_unknown_partition_and_gpu_type_list_the_choices() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["slurm.partition=nope"]).resolved(BASE)
    with pytest.raises(UsageError) as err:
        backend().dryrun(spec)
    assert "gpu-h100" in (err.value.hint or "")
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["resources.gpu_type=v100"]).resolved(BASE)
    with pytest.raises(UsageError) as err:
        backend().dryrun(spec)
    assert "a100" in (err.value.hint or "")


def test_sbatch_args_cannot_replace_what_the_script_needs() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["slurm.sbatch_args={output: /tmp/x}"]).resolved(BASE)
    with pytest.raises(UsageError, match="sbatch_args.output"):
        backend().dryrun(spec)
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["slurm.sbatch_args={mail-type: END}"]).resolved(BASE)
    assert "#SBATCH --mail-type=END\n" in backend().dryrun(spec).files[SCRIPT_FILE]


def test_exclusive_and_constraint() -> None:
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", ["slurm.exclusive=true", "slurm.constraint=ib"]).resolved(BASE)
    script = backend().dryrun(spec).files[SCRIPT_FILE]
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --constraint=ib\n" in script


def test_dryrun_is_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No subprocess, no files: rendering works on a laptop without Slurm."""
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("dryrun ran a subprocess")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    spec = load_spec(ROOT / "examples" / "pretrain.yaml", [f"checkpoint.dir={tmp_path}/runs/{{name}}",
                                                           f"data.prepared={tmp_path}/data/web"])
    before = spec.model_dump()
    backend(shared_root=str(tmp_path)).dryrun(spec.resolved())
    assert spec.model_dump() == before
    assert not (tmp_path / "runs").exists()


def test_image_references() -> None:
    assert pyxis_image("ghcr.io/org/img:1") == "ghcr.io#org/img:1"
    assert pyxis_image("nvcr.io/nvidia/pytorch:24.05-py3") == "nvcr.io#nvidia/pytorch:24.05-py3"
    assert pyxis_image("ubuntu:22.04") == "ubuntu:22.04"
    assert pyxis_image("/shared/images/mbl.sqsh") == "/shared/images/mbl.sqsh"
    assert apptainer_image("ghcr.io/org/img:1") == "docker://ghcr.io/org/img:1"
    assert apptainer_image("/shared/images/mbl.sif") == "/shared/images/mbl.sif"


def test_cli_render_prints_the_script(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from launcher.cli import cli

    profile = tmp_path / "profile.yaml"
    import yaml

    profile.write_text(yaml.safe_dump(PROFILE))
    result = CliRunner().invoke(cli, ["render", "--slurm", "--profile", str(profile),
                                      str(ROOT / "examples" / "pretrain.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# slurm: sbatch --parsable /shared/runs/mbert-base-pretrain/job.sbatch\n")
    assert "# ---- job.sbatch ----\n#!/bin/bash\n" in result.output
    assert re.search(r"^#SBATCH --job-name=mbert-base-pretrain$", result.output, re.M)
