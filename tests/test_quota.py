"""Quota policy: parsing real squeue/sacct/sacctmgr output, the pre-check, cluster-native objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher import quota as q
from launcher.errors import SpecError
from launcher.spec import JobSpec

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

POLICY = """\
teams:
  nlp: {gpus: 4, max_gpus_per_job: 4, max_wall: "1-00:00:00", partitions: [gpu], queues: [nlp]}
  vision: {gpus: 8, gpus_by_type: {h100: 4}}
"""


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return q.load_policy(path)


def job(**over):
    base = {"kind": "pretrain", "name": "j", "team": "nlp", "data": {"train": ["a"]},
            "distributed": {"nodes": 1, "gpus_per_node": 4}, "train": {"global_batch_size": 32, "micro_batch_size": 8},
            "resources": {"time_limit": "04:00:00"}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(base)


@pytest.mark.parametrize("text,gpus", [("gres:gpu:4", 4), ("billing=1,cpu=1,gres/gpu=4,node=1", 4),
                                       ("gres/gpu:h100=8,gres/gpu=8", 8), ("N/A", 0), ("", 0), ("gpu:2", 2)])
def test_gpus_in_tres(text, gpus):
    assert q.gpus_in_tres(text) == gpus


def test_parse_squeue_counts_running_and_pending_per_account():
    usage = q.parse_squeue((FIXTURES / "squeue-quota.txt").read_text())
    assert (usage["nlp"].running, usage["nlp"].pending) == (4, 4)
    assert (usage["vision"].running, usage["vision"].pending) == (0, 4)  # 2 nodes x 2 GPUs
    assert usage["ops"].in_use == 0


def test_parse_sacctmgr_limits():
    text = "root||\nroot|root|\nnlp||gres/gpu=4\nnlp|root|\nops||\nvision||gres/gpu=8\n"
    assert q.parse_sacctmgr_limits(text) == {"root": None, "nlp": 4, "ops": None, "vision": 8}


def test_precheck_refuses_with_the_numbers(policy):
    problems = q.check_job(job(), policy, q.Usage("nlp", running=4))
    assert problems == ["team nlp: the job asks 4 GPUs, 4 are in use (running or pending), 4 allowed; wait for a "
                        "job to end or ask for 0 GPUs"]
    assert q.check_job(job(), policy, q.Usage("nlp")) == []


def test_precheck_per_job_wall_type_partition(policy):
    big = job(distributed={"nodes": 2, "gpus_per_node": 4}, train={"global_batch_size": 64})
    assert any("at most 4 per job" in p for p in q.check_job(big, policy, None))
    long = job(resources={"time_limit": "2-00:00:00"})
    assert any("exceeds the longest allowed" in p for p in q.check_job(long, policy, None))
    typed = job(team="vision", distributed={"gpus_per_node": 8}, train={"global_batch_size": 64},
                resources={"gpu_type": "h100"})
    assert any("8 h100 GPUs, 4 allowed" in p for p in q.check_job(typed, policy, None))
    assert any("partition 'cpu' not allowed" in p for p in q.check_job(job(), policy, None, partition="cpu"))
    assert any("no quota" in p for p in q.check_job(job(team="other"), policy, None))


def test_bad_policy_names_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("teams:\n  nlp: {gpus: -1, max_wall: 4h}\n")
    with pytest.raises(SpecError) as info:
        q.load_policy(path)
    paths = {p.path for p in info.value.problems}
    assert ("teams", "nlp", "gpus") in paths and ("teams", "nlp", "max_wall") in paths


def test_slurm_apply_commands(policy):
    lines = [" ".join(c) for c in q.slurm_apply_commands(policy)]
    assert "sacctmgr -i modify account where name=nlp set GrpTRES=gres/gpu=4 MaxTRESPerJob=gres/gpu=4 " \
           "MaxWall=1-00:00:00" in lines
    assert any(line.startswith("sacctmgr -i add account vision") for line in lines)


def test_report_from_sacct_aggregates_gpu_hours():
    rows = q.parse_sacct((FIXTURES / "sacct-quota.txt").read_text())
    by_team = {r["team"]: r for r in q.aggregate(rows, "team")}
    assert by_team["vision"]["gpu_hours"] == pytest.approx(4 * 20 / 3600, abs=1e-4)
    assert by_team["nlp"]["jobs"] == 2 and by_team["ops"]["gpu_hours"] == 0
    assert q.to_csv(q.aggregate(rows, "user")).splitlines()[0] == "user,jobs,gpu_hours"


def _crd_validator(name, version):
    import jsonschema

    crd = yaml.safe_load((SCHEMAS / name).read_text())
    [ver] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(ver["schema"]["openAPIV3Schema"])


def test_k8s_objects_validate(policy):
    import kubernetes_validate

    crds = {"ResourceFlavor": "kueue.x-k8s.io_resourceflavors.yaml", "ClusterQueue": "kueue.x-k8s.io_clusterqueues.yaml",
            "LocalQueue": "kueue.x-k8s.io_localqueues.yaml"}
    from launcher.quota_k8s import k8s_yaml

    objects = list(yaml.safe_load_all(k8s_yaml(policy)))
    kinds = [o["kind"] for o in objects]
    assert kinds.count("ResourceQuota") == 2 and kinds.count("ClusterQueue") == 2
    for obj in objects:
        if obj["kind"] in crds:
            errors = list(_crd_validator(crds[obj["kind"]], obj["apiVersion"].split("/")[1]).iter_errors(obj))
            assert not errors, (obj["kind"], errors[0].message)
        else:
            kubernetes_validate.validate(obj, "1.30", strict=True)
    quotas = {o["metadata"]["namespace"]: o["spec"]["hard"]["requests.nvidia.com/gpu"] for o in objects
              if o["kind"] == "ResourceQuota"}
    assert quotas == {"nlp": "4", "vision": "8"}


@pytest.mark.slurm
def test_quota_apply_sets_the_limits_in_slurm(tmp_path):
    import subprocess

    path = tmp_path / "policy.yaml"
    path.write_text("teams:\n  qtest: {gpus: 2, max_gpus_per_job: 2, max_wall: '02:00:00'}\n")
    policy = q.load_policy(path)
    try:
        q.slurm_apply(policy, run=True)
        q.slurm_apply(policy, run=True)  # idempotent
        out = subprocess.run(["sacctmgr", "-nP", "show", "assoc", "where", "account=qtest", "format=account,user,"
                              "grptres,maxtresperjob,maxwall"], capture_output=True, text=True, check=True).stdout
        row = [line for line in out.splitlines() if line.startswith("qtest||")][0]
        assert row == "qtest||gres/gpu=2|gres/gpu=2|02:00:00"
    finally:
        subprocess.run(["sacctmgr", "-i", "delete", "account", "qtest"], capture_output=True)


def test_precheck_counts_the_account_and_partition_the_job_is_submitted_to(tmp_path, monkeypatch):
    """The profile's default account and partition, as the Slurm renderer uses them: the use of account
    `research` (where the job is charged) is what counts, not that of an account named after the team."""
    from launcher.backends.slurm import SlurmBackend
    from launcher.cli import _quota_precheck
    from launcher.profile import Profile

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    monkeypatch.setenv("MBL_QUOTA_POLICY", str(policy))
    backend = SlurmBackend()
    backend._profile = Profile.model_validate({"name": "p", "slurm": {
        "default_account": "research", "partitions": [{"name": "batch", "default": True}], "shared_root": "/"}})
    # squeue's view: account research already holds 4 GPUs, account nlp none
    monkeypatch.setattr(q, "slurm_usage", lambda notes=None: {"research": q.Usage("research", running=4)})
    with pytest.raises(q.QuotaExceeded) as err:
        _quota_precheck("slurm", job(distributed={"gpus_per_node": 1}, train={"global_batch_size": 8}), backend)
    assert "1 GPUs, 4 are in use" in str(err.value)
    assert "partition 'batch' not allowed (gpu)" in str(err.value)  # the profile's default partition
