"""Each validation rule of the job spec, with the message a user sees."""

from __future__ import annotations

import pytest

from launcher.errors import SpecError
from launcher.loading import load_spec
from launcher.spec import JobSpec, parse_time_limit

BASE = """\
kind: pretrain
name: demo
data:
  train: [corpus.txt]
train:
  max_steps: 100
  global_batch_size: 32
  micro_batch_size: 8
distributed:
  nodes: 2
  gpus_per_node: 2
checkpoint:
  every_steps: 50
"""


def load_text(tmp_path, text, sets=None):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_spec(path, sets)


def problems(tmp_path, text, sets=None):
    with pytest.raises(SpecError) as info:
        load_text(tmp_path, text, sets)
    return info.value.problems


def test_base_spec_is_valid_and_derives_accumulation(tmp_path):
    spec = load_text(tmp_path, BASE)
    assert spec.distributed.world_size == 4
    assert spec.grad_accum == 1
    spec = load_text(tmp_path, BASE, ["train.global_batch_size=128"])
    assert spec.grad_accum == 4


def test_batch_that_does_not_divide_is_refused_with_the_arithmetic(tmp_path):
    [p] = problems(tmp_path, BASE, ["train.global_batch_size=40"])
    assert p.path == ("train", "global_batch_size")
    assert p.source == "--set train.global_batch_size=40"  # the override is where the value came from
    assert "micro_batch_size (8) x world size (2 nodes x 2 GPUs = 4) = 32" in p.message
    assert "try 32 or 64" in p.message


def test_wrong_type_names_file_line_field_and_value(tmp_path):
    [p] = problems(tmp_path, BASE.replace("max_steps: 100", "max_steps: lots"))
    assert (p.source.endswith("spec.yaml"), p.line, p.path, p.given) == (True, 6, ("train", "max_steps"), "lots")
    assert "integer" in p.message


def test_unknown_key_suggests_the_close_one(tmp_path):
    [p] = problems(tmp_path, BASE.replace("micro_batch_size: 8", "micro_batch_size: 8\n  warmup_step: 10"))
    assert p.path == ("train", "warmup_step")
    assert p.line == 9
    assert "did you mean `warmup_steps`" in p.message


def test_unknown_top_level_key(tmp_path):
    [p] = problems(tmp_path, BASE + "chekpoint: {}\n")
    assert "did you mean `checkpoint`" in p.message


def test_enum_lists_the_allowed_values(tmp_path):
    [p] = problems(tmp_path, BASE, ["train.precision=fp8"])
    assert p.path == ("train", "precision")
    assert "'bf16', 'fp16' or 'fp32'" in p.message
    assert p.source == "--set train.precision=fp8"


def test_range_is_reported(tmp_path):
    [p] = problems(tmp_path, BASE, ["distributed.zero_stage=4"])
    assert p.path == ("distributed", "zero_stage") and "3" in p.message


@pytest.mark.parametrize("name", ["Demo", "1demo", "demo_", "demo-", "a" * 41])
def test_name_must_be_a_short_dns_label(tmp_path, name):
    [p] = problems(tmp_path, BASE.replace("name: demo", f"name: {name}"))
    assert p.path == ("name",)
    assert "DNS-1035" in p.message or "at most 40" in p.message


def test_every_steps_no_larger_than_max_steps(tmp_path):
    [p] = problems(tmp_path, BASE, ["checkpoint.every_steps=500"])
    assert p.path == ("checkpoint", "every_steps") and "larger than train.max_steps" in p.message


def test_finetune_needs_init_from_and_task(tmp_path):
    text = BASE.replace("kind: pretrain", "kind: finetune")
    found = {p.message.split(":")[0] for p in problems(tmp_path, text)}
    assert "a finetune needs model.init_from" in found
    assert "a finetune needs a task" in found


def test_task_only_for_finetune(tmp_path):
    [p] = problems(tmp_path, BASE + "task: {type: classification}\n")
    assert "only used by a finetune" in p.message


@pytest.mark.parametrize(
    "value,seconds",
    [("90", 5400), ("90:30", 5430), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780),
     ("1-00:00:01", 86401)],
)
def test_slurm_time_formats(value, seconds):
    assert parse_time_limit(value) == seconds


@pytest.mark.parametrize("value", ["4h", "1:2:3:4", "-5", "0", "1-"])
def test_bad_time_limits_are_refused(tmp_path, value):
    [p] = problems(tmp_path, BASE + f"resources:\n  time_limit: '{value}'\n")
    assert p.path == ("resources", "time_limit")
    assert "HH:MM:SS" in p.message or "positive" in p.message


def test_secret_needs_a_source(tmp_path):
    [p] = problems(tmp_path, BASE + "secrets:\n  TOKEN: {key: x}\n")
    assert p.path[:2] == ("secrets", "TOKEN")


def test_three_problems_reported_at_once(tmp_path):
    text = BASE.replace("max_steps: 100", "max_steps: ten\n  lr_rate: 0.1").replace(
        "global_batch_size: 32", "global_batch_size: 30")
    found = problems(tmp_path, text)
    assert [p.path for p in found] == [("train", "max_steps"), ("train", "lr_rate"), ("train", "global_batch_size")]
    assert [p.line for p in found] == [6, 7, 8]


def test_fingerprint_ignores_where_the_job_runs():
    a = JobSpec(kind="pretrain", name="x", data={"train": ["a.txt"]})
    b = a.model_copy(update={"slurm": a.slurm.model_copy(update={"partition": "other"})})
    c = JobSpec(kind="pretrain", name="x", data={"train": ["a.txt"]}, train={"lr": 1e-3})
    assert a.training_fingerprint() == b.training_fingerprint() != c.training_fingerprint()
