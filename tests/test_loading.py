"""Loading: extends with deep merge, --set with the field's type, ${env:NAME}, YAML errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import SpecError
from launcher.loading import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(path, text):
    path.write_text(text)
    return path


def test_extends_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", "kind: pretrain\nname: base\ndata: {train: [a.txt], seq_len: 256}\n"
          "train: {lr: 0.001, max_steps: 10, global_batch_size: 8, micro_batch_size: 8}\n"
          "checkpoint: {every_steps: 5}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", "extends: ../base.yaml\nname: child\ntrain: {lr: 0.002}\n")
    spec = load_spec(child)
    assert spec.name == "child"
    assert spec.train.lr == 0.002 and spec.train.max_steps == 10  # merged, not replaced
    assert spec.data.seq_len == 256


def test_error_in_parent_points_at_the_parent_line(tmp_path):
    write(tmp_path / "base.yaml", "kind: pretrain\nname: base\ndata: {train: [a.txt]}\ntrain:\n  lr: -1\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\n")
    with pytest.raises(SpecError) as info:
        load_spec(child)
    [p] = info.value.problems
    assert p.source.endswith("base.yaml") and p.line == 5 and p.path == ("train", "lr")


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "a.yaml")
    [problem] = info.value.problems
    assert "cycle" in problem.message and problem.line == 1 and problem.path == ("extends",)


def test_set_takes_the_fields_type(tmp_path):
    path = write(tmp_path / "s.yaml", "kind: pretrain\nname: x\ndata: {train: [a.txt]}\n")
    spec = load_spec(path, ["train.max_steps=2000", "train.lr=3e-4", "model.init_from=123", "data.train=[b.txt, c.txt]",
                            "slurm.exclusive=true", "env.SEED=7"])
    assert spec.train.max_steps == 2000 and spec.train.lr == 3e-4
    assert spec.model.init_from == "123"  # a string field keeps a string
    assert spec.data.train == ["b.txt", "c.txt"]
    assert spec.slurm.exclusive is True
    assert spec.env == {"SEED": "7"}


def test_set_without_equals_is_a_usage_error(tmp_path):
    path = write(tmp_path / "s.yaml", "kind: pretrain\nname: x\ndata: {train: [a.txt]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, ["train.lr"])
    assert "KEY.PATH=VALUE" in info.value.problems[0].message


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("MBL_TEST_DATA", "/data/corpus")
    path = write(tmp_path / "s.yaml", "kind: pretrain\nname: x\ndata:\n  train: ['${env:MBL_TEST_DATA}/a.txt']\n"
                 "  prepared: ${env:MBL_NOT_SET_X:-/default}\n")
    spec = load_spec(path)
    assert spec.data.train == ["/data/corpus/a.txt"] and spec.data.prepared == "/default"


def test_missing_env_is_reported_with_its_line(tmp_path):
    path = write(tmp_path / "s.yaml", "kind: pretrain\nname: x\ndata:\n  train: ['${env:MBL_SURELY_UNSET}']\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    [p] = info.value.problems
    assert p.line == 4 and "MBL_SURELY_UNSET is not set" in p.message


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = write(tmp_path / "s.yaml", "kind: pretrain\nname: [x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0].line is not None and "not valid YAML" in info.value.problems[0].message


def test_unsafe_yaml_is_refused(tmp_path):
    path = write(tmp_path / "s.yaml", "kind: !!python/object/apply:os.system ['true']\nname: x\n")
    with pytest.raises(SpecError):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.problems[0].message


def test_set_into_a_value_is_reported_against_the_override():
    """`--set train.max_steps.x=1`: the error names the --set, not the spec file's line of train.max_steps."""
    with pytest.raises(SpecError) as err:
        load_spec(EXAMPLES / "pretrain-tiny.yaml", ["train.max_steps.x=1"])
    text = err.value.render()
    assert text.startswith("error: --set train.max_steps.x=1: train.max_steps:"), text
    assert "pretrain-tiny.yaml" not in text and "set train.max_steps=VALUE" in text


def test_profile_and_policy_errors_have_lines_and_suggestions(tmp_path):
    """One loader for spec, cluster profile and quota policy: file:line, field path, "did you mean"."""
    from launcher.profile import load_profile
    from launcher.quota import load_policy

    profile = tmp_path / "profile.yaml"
    profile.write_text("name: dev\nslurm:\n  version: '22.05'\n  shared_rot: /shared\n"
                       "  partitions:\n    - name: gpu\n      defualt: true\n")
    with pytest.raises(SpecError) as err:
        load_profile(profile)
    text = err.value.render()
    assert f"{profile}:4: slurm.shared_rot: unknown key `shared_rot`; did you mean `shared_root`?" in text, text
    assert f"{profile}:7: slurm.partitions.0.defualt: unknown key `defualt`; did you mean `default`?" in text, text

    policy = tmp_path / "quota.yaml"
    policy.write_text("teams:\n  nlp:\n    gpus: 4\n    max_gpu_per_job: 4\n  vision: {gpus: -1}\n")
    with pytest.raises(SpecError) as err:
        load_policy(policy)
    text = err.value.render()
    assert f"{policy}:4: teams.nlp.max_gpu_per_job: unknown key `max_gpu_per_job`; did you mean " \
           "`max_gpus_per_job`?" in text, text
    assert f"{policy}:5: teams.vision.gpus:" in text and "(given: -1)" in text, text


def test_config_overrides_from_set_are_typed() -> None:
    """ModernBertConfig rejects "50368" for vocab_size: --set values of config_overrides become numbers/booleans."""
    spec = load_spec(EXAMPLES / "pretrain-tiny.yaml", sets=[
        "model.config_overrides.vocab_size=50368", "model.config_overrides.norm_eps=1e-5",
        "model.config_overrides.tie_word_embeddings=false", "model.config_overrides.hidden_activation=gelu"])
    assert spec.model.config_overrides == {"vocab_size": 50368, "norm_eps": 1e-5, "tie_word_embeddings": False,
                                           "hidden_activation": "gelu"}
