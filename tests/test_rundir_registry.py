"""The run-directory guard and the job registry."""

from __future__ import annotations

import pytest

from launcher.backends.base import JobRef
from launcher.errors import NotFound, UsageError
from launcher.registry import Registry
from launcher.rundir import check_run_dir, write_spec
from launcher.spec import JobSpec


def spec(tmp_path, **train):
    return JobSpec.model_validate({"kind": "pretrain", "name": "r", "data": {"train": ["a.txt"]},
                                   "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 10},
                                   "train": {"max_steps": 100, **train}})


def test_new_then_same_spec_resumes(tmp_path):
    first = spec(tmp_path)
    assert check_run_dir(first) == "new"
    write_spec(first)
    # a longer run and another partition are the same job: it resumes
    again = spec(tmp_path, max_steps=200).model_copy(update={"slurm": first.slurm.model_copy(update={"partition": "x"})})
    assert check_run_dir(again) == "resume"


def test_another_layout_with_the_same_global_batch_resumes(tmp_path):
    """More or fewer nodes, GPUs or a smaller micro batch: the same run (the trainer converts its checkpoints);
    another global batch or ZeRO stage is another job."""
    first = spec(tmp_path, global_batch_size=32, micro_batch_size=8)
    write_spec(first)
    for nodes, gpus, micro in ((2, 2, 8), (1, 1, 4), (4, 8, 1)):
        moved = spec(tmp_path, global_batch_size=32, micro_batch_size=micro)
        moved = moved.model_copy(update={"distributed": moved.distributed.model_copy(
            update={"nodes": nodes, "gpus_per_node": gpus})})
        assert check_run_dir(moved) == "resume", (nodes, gpus, micro)
    with pytest.raises(UsageError, match="train.global_batch_size"):
        check_run_dir(spec(tmp_path, global_batch_size=64, micro_batch_size=8))
    zero3 = first.model_copy(update={"distributed": first.distributed.model_copy(update={"zero_stage": 3})})
    with pytest.raises(UsageError, match="distributed.zero_stage"):
        check_run_dir(zero3)


def test_different_spec_is_refused_and_names_the_change(tmp_path):
    write_spec(spec(tmp_path))
    with pytest.raises(UsageError) as info:
        check_run_dir(spec(tmp_path, lr=0.1))
    assert "train.lr" in str(info.value) and "another name" in info.value.hint
    assert check_run_dir(spec(tmp_path, lr=0.1), force=True) == "resume"
    # nothing was overwritten by the refusal
    assert "lr: 0.0005" in (tmp_path / "run" / "spec.yaml").read_text()


def test_registry_roundtrip_and_lookup(tmp_path):
    reg = Registry(tmp_path / "r.db")
    reg.add(JobRef("slurm", "101", "alpha", "/runs/alpha", {"attempt": 0}), team="nlp", kind="pretrain", gpus=8)
    newer = reg.add(JobRef("slurm", "102", "alpha", "/runs/alpha"), team="nlp", gpus=8)
    reg.add(JobRef("k8s", "mbl/beta", "beta", "/runs/beta"))
    assert reg.get("alpha").job_id == "102"  # the newest of that name
    assert reg.get("101").extra == {"attempt": 0}
    assert reg.get(f"#{newer.id}").job_id == "102"
    assert [r.name for r in reg.list(backend="k8s")] == ["beta"]
    reg.save_extra(newer, {"cancelled": True})
    assert Registry(tmp_path / "r.db").get("102").ref.extra == {"cancelled": True}
    with pytest.raises(NotFound):
        reg.get("gamma")
