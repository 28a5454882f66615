"""The Slurm tour a new user follows: after slurm/dev/up.sh, `mbl submit --slurm examples/pretrain-tiny.yaml`
with no --set (the dev profile maps the team `default` to an account and the example fits the nodes), and
sbatch's refusals translated into the choices that fix them.

The first tests need no cluster (captured sacctmgr/sinfo output); the last ones run on the dev cluster."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.backends.slurm import SlurmBackend, parse_accounts, parse_sinfo, refusal_kind
from launcher.backends.slurm_render import sbatch_options
from launcher.errors import BackendError, UsageError
from launcher.loading import load_spec
from launcher.profile import Profile

REPO = Path(__file__).resolve().parents[1]
ACCOUNT_REFUSAL = ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination "
                   "specified")
NODES_REFUSAL = ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission "
                 "failed: Requested node configuration is not available")
SACCTMGR = "ops\nvision\nnlp\nroot\n"  # sacctmgr -n -P show associations where user=root format=account
SINFO = "gpu*|2|4000|gpu:4\ndebug|4|16000|(null)\n"  # sinfo -h --format=%P|%c|%m|%G


def spec(*sets: str):
    return load_spec(REPO / "examples" / "pretrain-tiny.yaml", list(sets)).resolved(REPO)


def backend(**slurm) -> SlurmBackend:
    b = SlurmBackend()
    b._profile = Profile.model_validate({"slurm": {"shared_root": "/", "container_runtime": "none", **slurm}})
    return b


class Answers:
    """Stands in for SlurmBackend._run: sacctmgr and sinfo answer with captured output."""

    def __init__(self, **out: str):
        self.out, self.calls = out, []

    def __call__(self, args, ref=None, check=True, timeout=60):
        self.calls.append(args)
        return subprocess.CompletedProcess(args, 0, self.out.get(args[0], ""), "")


def test_parsers_of_captured_output():
    assert refusal_kind(ACCOUNT_REFUSAL) == "Invalid account or account/partition combination"
    assert refusal_kind("sbatch: error: invalid partition specified: nosuch") == "invalid partition specified"
    assert refusal_kind(NODES_REFUSAL) == "Requested node configuration is not available"
    assert refusal_kind("sbatch: error: Slurm temporarily unable to accept job") is None
    assert parse_accounts(SACCTMGR) == ["nlp", "ops", "root", "vision"]
    assert parse_sinfo(SINFO) == [
        {"partition": "gpu", "default": True, "cpus": "2", "memory": "4000M", "gres": "gpu:4"},
        {"partition": "debug", "default": False, "cpus": "4", "memory": "16000M", "gres": "no GPUs"}]


def test_the_profile_maps_teams_to_accounts():
    mapped = backend(accounts={"default": "nlp"}, default_account="research").profile.slurm
    assert sbatch_options(spec(), mapped)["account"] == "nlp"  # the map wins over default_account
    assert sbatch_options(spec("team=vision"), mapped)["account"] == "research"  # unmapped team: as before
    assert sbatch_options(spec("slurm.account=special"), mapped)["account"] == "special"  # the spec wins
    assert sbatch_options(spec(), backend().profile.slurm)["account"] == "default"  # nothing maps it


def test_an_unknown_account_lists_the_users_accounts(tmp_path):
    b = backend()
    b._run = Answers(sacctmgr=SACCTMGR)
    err = b._refusal(ACCOUNT_REFUSAL, spec(), tmp_path / "job.sbatch")
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert "sbatch refused account 'default' (the spec names no team)" in str(err)
    assert "may use: nlp, ops, root, vision" in err.hint and "slurm.accounts" in err.hint
    assert b._run.calls[0][:3] == ["sacctmgr", "--noheader", "--parsable2"]


def test_a_job_no_node_can_hold_says_what_the_nodes_have(tmp_path):
    b = backend()
    b._run = Answers(sinfo=SINFO)
    err = b._refusal(NODES_REFUSAL, spec("resources.mem_per_node=9G"), tmp_path / "job.sbatch")
    assert isinstance(err, UsageError)
    assert "(2 CPUs, 9G memory, GPUs 2)" in str(err)
    assert "partition gpu: 2 CPUs, 4000M memory, gpu:4" in err.hint and "resources.mem_per_node" in err.hint
    err = b._refusal("sbatch: error: invalid partition specified: nosuch", spec(), tmp_path / "job.sbatch")
    assert isinstance(err, UsageError) and "partitions: gpu (default), debug" in err.hint
    other = b._refusal("sbatch: error: Slurm temporarily unable to accept job", spec(), tmp_path / "job.sbatch")
    assert type(other) is BackendError and other.exit_code == 1


# ---- on the dev cluster ---------------------------------------------------------------------------

def tour_env(cluster: dict, work: Path) -> dict:
    """A new user's shell after `source env.sh`: MBL_PROFILE at the dev profile, a registry of its own."""
    env = dict(cluster["env"])
    env["MBL_PROFILE"] = str(cluster["profile"])
    env["MBL_HOME"] = str(work / "home")
    return env


def run(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slurm
def test_the_tour_submits_the_tiny_example_as_is(cluster, tmp_path):
    """From a checkout-like folder (examples/ beside it, as in the repository root): no --set at all."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = tour_env(cluster, tmp_path)
    submitted = run(env, tmp_path, "submit", "--slurm", "examples/pretrain-tiny.yaml")
    assert submitted.returncode == 0, submitted.stderr
    assert "submitted pretrain 'tiny-pretrain' to slurm" in submitted.stderr
    run_dir = tmp_path / "runs" / "tiny-pretrain"
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --account=nlp" in script and "#SBATCH --mem=3G" in script
    deadline = time.monotonic() + 300
    while True:
        row = json.loads(run(env, tmp_path, "status", "tiny-pretrain", "-o", "json").stdout)
        if row["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        assert time.monotonic() < deadline, (row, run(env, tmp_path, "logs", "tiny-pretrain").stdout[-3000:])
        time.sleep(3)
    assert row["state"] == "COMPLETED", (row, run(env, tmp_path, "logs", "tiny-pretrain").stdout[-3000:])
    assert (row["step"], row["total_steps"], row["percent"]) == (150, 150, 100.0)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 150
    log = run(env, tmp_path, "logs", "tiny-pretrain").stdout
    assert "[mbl] step 150/150: loss" in log and "held-out MLM loss" in log


@pytest.mark.slurm
def test_an_unknown_account_is_reported_with_the_valid_ones(cluster, tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = tour_env(cluster, tmp_path)
    refused = run(env, tmp_path, "submit", "--slurm", "examples/pretrain-tiny.yaml", "--set", "slurm.account=nosuch")
    assert refused.returncode == 2, refused.stderr
    assert "sbatch refused account 'nosuch' (slurm.account)" in refused.stderr
    user_accounts = subprocess.run(["sacctmgr", "-n", "-P", "show", "associations", "where",
                                    f"user={getpass.getuser()}", "format=account"], env=env, capture_output=True,
                                   text=True).stdout
    listed = ", ".join(sorted(set(user_accounts.split())))
    assert f"may use: {listed}" in refused.stderr and "nlp" in listed, refused.stderr
