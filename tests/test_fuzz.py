"""Property-based fuzzing (hypothesis) of loading, validation and rendering: every case ends in a valid spec or
in exit code 2 whose errors name the file and line (or the option) and the field; never a traceback.

Inputs: the examples with fields set to hostile values (wrong types, huge and negative numbers, unicode,
control characters, shell syntax, deep nesting), deleted, or joined by unknown keys; YAML text mutated (lines
inserted, truncated, tabs, a BOM, bytes that are no UTF-8, alias bombs, recursive aliases); missing, unreadable
and looping files and `extends` chains (cycles included); hostile `--set` expressions and `${env:}` values;
cluster profiles and quota policies mutated the same way; every option of `mbl validate`, `mbl render`
(--cluster, --slurm/--k8s/--local, --set, --profile, -n, --context, -o) and `mbl submit --dry-run`. Driven
through click's CliRunner and through the functions (load_spec, load_document, apply_sets, load_profile,
load_policy). A spec that loads must survive the round trip the trainer makes (spec.yaml -> JobSpec), and
rendered Kubernetes objects must carry valid names and labels.

The number of examples: tests/fuzz_util.py (MBL_FUZZ_PROFILE=ci|long); the counts print at the end.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from example_files import JOB_SPECS
from fuzz_util import (HOSTILE_INTS, HOSTILE_STRINGS, check_cli, field_paths, k8s_problems, nested, ran, text,
                       value)
from launcher.cli import cli
from launcher.errors import MblError, SpecError
from launcher.loading import Origins, apply_sets, load_document, load_spec
from launcher.profile import Profile, load_profile
from launcher.quota import QuotaPolicy, check_job, load_policy
from launcher.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/mbl-project/mbl-trainer:0.1.0"


def _on_shared(doc: dict[str, Any]) -> dict[str, Any]:
    """An example with an image and every path on /shared: valid for every backend (local: one node)."""
    doc = copy.deepcopy(doc)
    doc["image"] = IMAGE
    doc.setdefault("checkpoint", {})["dir"] = "/shared/runs/{name}"
    data = doc.setdefault("data", {})
    for key in ("train", "validation", "test"):
        if key in data:
            data[key] = [f"/shared/data/{Path(p).name}" for p in data[key]]
    for key in ("prepared", "tokenizer"):
        if data.get(key):
            data[key] = f"/shared/data/{Path(data[key]).name}"
    if (doc.get("model") or {}).get("init_from"):
        doc["model"]["init_from"] = "/shared/runs/tiny-pretrain"
    return doc


EXAMPLES = JOB_SPECS
BASES = [_on_shared(yaml.safe_load(p.read_text())) for p in EXAMPLES]
POLICY = yaml.safe_load((REPO / "examples" / "quota.yaml").read_text())
PROFILE = {
    "name": "fuzz",
    "slurm": {
        "version": "23.11",
        "partitions": [{"name": "gpu", "gpu_types": ["h100", "a100", "fake"], "default": True}, {"name": "debug"}],
        "default_account": "ml", "accounts": {"default": "nlp"}, "default_qos": "normal",
        "container_runtime": "pyxis", "shared_root": "/shared", "setup": ["module load cuda/12.4"],
    },
    "k8s": {"gpu_types": {gpu: {
        "node_selector": {"nvidia.com/gpu.product": f"NVIDIA-{gpu.upper()}-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    } for gpu in ("h100", "a100", "fake")}},
}

SPEC_PATHS = field_paths(JobSpec) + [("env", "X"), ("secrets", "TOKEN"), ("secrets", "TOKEN", "file"),
                                     ("model", "config_overrides", "hidden_size"), ("slurm", "sbatch_args", "mail-type"),
                                     ("k8s", "node_selector", "pool"), ("k8s", "tolerations", 0, "key"),
                                     ("data", "train", 0), ("slurm", "setup", 0), ("extends",)]
PROFILE_PATHS = field_paths(Profile) + [("slurm", "partitions", 0, "name"), ("slurm", "partitions", 0, "gpu_types"),
                                        ("slurm", "partitions", 1, "default"), ("slurm", "accounts", "default"),
                                        ("slurm", "setup", 0), ("k8s", "gpu_types", "h100", "node_selector"),
                                        ("k8s", "gpu_types", "h100", "resource"),
                                        ("k8s", "gpu_types", "h100", "tolerations", 0, "value")]
POLICY_PATHS = [("cluster_gpus",), ("teams",)] + [("teams", team, *p) for team in ("nlp", "ops", "new-team")
                                                  for p in [(), *field_paths(QuotaPolicy.model_fields["teams"]
                                                                             .annotation.__args__[1])]]


# ---- mutating documents -------------------------------------------------------------------------------


def put(doc: Any, path: tuple, item: Any) -> Any:
    """`doc` with `item` at `path`; sections on the way are made (a scalar or list in the way is replaced)."""
    if not path:
        return item
    if isinstance(doc, list) and isinstance(path[0], int):
        doc = doc + [None] * (path[0] + 1 - len(doc))
        doc[path[0]] = put(doc[path[0]], path[1:], item)
        return doc
    if not isinstance(doc, dict):
        doc = {}
    doc[path[0]] = put(doc.get(path[0]), path[1:], item)
    return doc


def drop(doc: Any, path: tuple) -> None:
    for part in path[:-1]:
        if not isinstance(doc, (dict, list)):
            return
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(doc, dict):
        doc.pop(path[-1], None)


hostile = st.one_of(value, st.sampled_from(HOSTILE_INTS), st.sampled_from(HOSTILE_STRINGS),
                    st.builds(nested, st.sampled_from([3, 31, 40, 200])))


@st.composite
def mutated(draw: Any, bases: list[dict[str, Any]], paths: list[tuple]) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "drop", "unknown"]))
        path = draw(st.sampled_from(paths))
        if op == "set":
            doc = put(doc, path, draw(hostile))
        elif op == "drop":
            drop(doc, path)
        else:
            doc = put(doc, path[:-1] + (draw(text),), draw(hostile))
    return doc


YAML_LINES = ["\tkind: pretrain", "extends: spec.yaml", "extends: missing.yaml", "extends: [a, b]", "- item",
              "key: [unclosed", "key: {a: 1", "'quoted", "&anchor", "*undefined", "!!python/object/apply:os.system [x]",
              "? [a, b]\n: 1", "? {a: 1}\n: 1", "1: one", "~: null", "true: yes", "<<: *x", "<<: {name: merged}",
              "%YAML 1.1", "---", "...", "name: 'a''b'", 'name: "\\x00\\ud800"', "name: !!binary aGVsbG8=",
              "train: !!set {a, b}", "train: !!timestamp 2001-12-14", "data: {train: !!str 1}"]


def _billion_laughs() -> str:
    out = ["env:", "  A: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        out.append(f"  A{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]")
    return "\n".join(out) + "\n"


@st.composite
def as_yaml(draw: Any, doc: Any) -> bytes:
    """A document as YAML bytes, sometimes mutated as text."""
    text_ = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=False,
                           default_flow_style=draw(st.sampled_from([False, None, True])), width=draw(st.sampled_from(
                               [80, 20, 10**6])))
    mode = draw(st.sampled_from(["plain"] * 8 + ["line", "truncate", "bytes", "bom", "tab", "bomb", "recursive",
                                                 "deep", "empty", "scalar"]))
    lines = text_.splitlines()
    if mode == "line":
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, draw(st.one_of(st.sampled_from(YAML_LINES), text)))
    elif mode == "truncate":
        text_ = text_[:draw(st.integers(0, len(text_)))]
        lines = text_.splitlines()
    elif mode == "tab" and lines:
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] = "\t" + lines[at].lstrip(" ")
    elif mode == "bomb":
        lines.append(_billion_laughs())
    elif mode == "recursive":
        lines.append(draw(st.sampled_from(["env: &r {X: *r}", "data: {train: &t [*t]}", "model: &m {<<: *m}"])))
    elif mode == "deep":
        depth = draw(st.sampled_from([33, 300, 1000]))  # 1000: past Python's recursion limit when composed
        lines.append("env: {X: " + "[" * depth + "]" * depth + "}")
    elif mode == "empty":
        lines = draw(st.sampled_from([[], ["# only a comment"], ["---"], ["null"], ["~"]]))
    elif mode == "scalar":
        lines = draw(st.sampled_from([["just text"], ["- a", "- b"], ["42"], ["[1, 2]"]]))
    out = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    if mode == "bytes":
        at = draw(st.integers(0, len(out)))
        out = out[:at] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\x00", b"\xc3", b"\xed\xa0\x80"])) + out[at:]
    elif mode == "bom":
        out = b"\xef\xbb\xbf" + out
    return out


def spec_bytes() -> st.SearchStrategy[bytes]:
    return mutated(BASES, SPEC_PATHS).flatmap(as_yaml)


# ---- options -----------------------------------------------------------------------------------------

dotted = st.sampled_from([".".join(str(p) for p in path) for path in SPEC_PATHS])
set_key = st.one_of(dotted, st.builds(lambda a, b: f"{a}.{b}", dotted, text), text,
                    st.sampled_from(["", ".", "a..b", ".name", "name.", "train.max_steps.x", "data.train.0",
                                     "extends", "k8s.namespace"]))


def _flow(item: Any) -> str:
    dumped = yaml.safe_dump(item, default_flow_style=True, allow_unicode=True, width=10**6)
    return dumped.removesuffix("\n").removesuffix("\n...").removesuffix("...")


set_value = st.one_of(text, st.builds(_flow, value), st.sampled_from(["[", "{", "[&a [*a]]", "null", "~", "[*x]",
                                                                      "{a: 1, a: 2}", "3e-4", "-1", "10**9"]))
PLAUSIBLE_SETS = ["train.lr=3e-4", "train.max_steps=2000", "distributed.nodes=1", "name=fuzz-job", "team=nlp",
                  "env.SEED=7", "data.train=[/shared/a.txt]", "slurm.qos=high", "k8s.namespace=research",
                  "resources.time_limit=2-00:00:00", "train.betas=[0.9, 0.95]", "model.config_overrides={a: 1}",
                  "slurm.sbatch_args.mail-type=END", "slurm.setup=[module load cuda]", "export.onnx=true"]
set_expr = st.one_of(st.builds(lambda k, v: f"{k}={v}", set_key, set_value), text, st.sampled_from(PLAUSIBLE_SETS))
namespace = st.one_of(st.sampled_from(["research", "Bad_NS", "-x", "a" * 64, "", "ns\n", "ns;x", "kube-system"]),
                      text)


@st.composite
def render_options(draw: Any, tmp: Path, profile: Path) -> list[str]:
    opts: list[str] = []
    opts += draw(st.sampled_from([[], ["--cluster", "slurm"], ["--slurm"], ["--k8s"], ["--cluster", "k8s"],
                                  ["--local"], ["--cluster", "local", "--k8s"], ["--cluster", "nope"], ["-c", ""]]))
    for expr in draw(st.lists(set_expr, max_size=3)):
        opts += ["--set", expr]
    if draw(st.booleans()):
        opts += ["-n", draw(namespace)]
    opts += draw(st.sampled_from([["--profile", str(profile)], ["--profile", str(profile)], [],
                                  ["--profile", str(tmp / "missing.yaml")], ["--profile", str(tmp)],
                                  ["--profile", str(tmp / "spec.yaml")]]))
    if draw(st.integers(0, 5)) == 0:
        opts += ["--context", draw(text)]
    if draw(st.integers(0, 5)) == 0:
        opts += ["-o", str(draw(st.sampled_from([tmp / "out", tmp / "spec.yaml", tmp / "spec.yaml" / "sub"])))]
    return opts


# ---- running -------------------------------------------------------------------------------------------


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, args, env=env)


def has_content(raw: bytes) -> bool:
    try:
        return yaml.compose(raw.decode("utf-8")) is not None
    except Exception:  # not YAML, not UTF-8, too deep: such errors carry their own line (or none exists)
        return False


def check_loaded(path: Path, sets: list[str] | None = None) -> JobSpec | None:
    """load_spec: a JobSpec that survives the trainer's round trip and resolving, or SpecError."""
    try:
        spec = load_spec(path, sets)
    except SpecError as exc:
        assert exc.exit_code == 2 and exc.problems
        for problem in exc.problems:
            assert problem.source != "<spec>", problem.render()
        return None
    again = JobSpec.model_validate(yaml.safe_load(spec.to_yaml()))
    assert again == spec, "the spec the trainer reads differs from the one validated"
    spec.resolved(Path("/shared/work"))
    return spec


def write_files(tmp: Path, spec: bytes, profile: Any = PROFILE) -> tuple[Path, Path]:
    (tmp / "spec.yaml").write_bytes(spec)
    (tmp / "profile.yaml").write_text(yaml.safe_dump(profile))
    return tmp / "spec.yaml", tmp / "profile.yaml"


# ---- the properties --------------------------------------------------------------------------------------


def test_the_bases_are_valid_everywhere(tmp_path: Path) -> None:
    """The examples the fuzzer mutates validate and render on every backend: a failure below is the mutation's."""
    for doc in BASES:
        spec, profile = write_files(tmp_path, yaml.safe_dump(doc).encode())
        for args in (["validate", str(spec)], ["render", str(spec), "--slurm", "--profile", str(profile)],
                     ["render", str(spec), "--k8s", "--profile", str(profile)]):
            result = invoke(args)
            assert result.exit_code == 0, (doc["name"], args, result.stderr)


@given(spec_bytes(), st.data())
def test_spec_files_through_the_cli(raw: bytes, data: st.DataObject) -> None:
    ran("spec files: mbl validate / render (slurm, k8s, local) / submit --dry-run")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        spec, profile = write_files(tmp, raw)
        sources, lined = [str(spec)], {str(spec)} if has_content(raw) else set()
        outcome = check_cli(invoke(["validate", str(spec), *data.draw(st.sampled_from([[], ["-q"]]))]), sources,
                            "validate", lined)
        loaded = check_loaded(spec)
        assert (outcome == "ok") == (loaded is not None)
        for cluster in (["--slurm"], ["--k8s"], ["--local"]):
            result = invoke(["render", str(spec), *cluster, "--profile", str(profile)])
            if check_cli(result, sources, f"render {cluster}", lined) == "ok" and cluster == ["--k8s"]:
                assert not k8s_problems(list(yaml.safe_load_all(result.stdout)))
        opts = data.draw(render_options(tmp, profile))
        if data.draw(st.booleans()) and "--k8s" not in opts and "k8s" not in opts and "-o" not in opts:
            flags = data.draw(st.lists(st.sampled_from(["--detach", "--force", "--no-quota-check", "--verbose"]),
                                       max_size=2, unique=True))
            argv = ["submit", str(spec), *opts, *flags, "--dry-run"]  # prints the request, submits nothing
        else:
            argv = ["render", str(spec), *opts]
        check_cli(invoke(argv), sources + [str(tmp / "missing.yaml"), str(tmp)], f"{argv}", lined)


@given(st.lists(set_expr, max_size=4), st.sampled_from(BASES))
def test_sets_through_apply_sets_and_load_spec(sets: list[str], base: dict[str, Any]) -> None:
    ran("--set: apply_sets and load_spec")
    try:
        apply_sets(copy.deepcopy(base), sets, Origins())
    except SpecError as exc:
        assert all(p.source.startswith("--set") for p in exc.problems), [p.render() for p in exc.problems]
    with tempfile.TemporaryDirectory() as tmp:
        spec, _ = write_files(Path(tmp), yaml.safe_dump(base).encode())
        check_loaded(spec, sets)
        args = ["validate", str(spec)] + [x for s in sets for x in ("--set", s)]
        check_cli(invoke(args), [str(spec)], f"validate {sets}", {str(spec)})


env_name = st.sampled_from(["MBL_FUZZ_A", "MBL_FUZZ_B", "MBL_FUZZ_UNSET"])
env_value = st.one_of(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), st.sampled_from(["4", "0.5", "true"]),
                      text, st.sampled_from(HOSTILE_STRINGS)).map(
    lambda s: "".join(c for c in s if c != "\x00" and not "\ud800" <= c <= "\udfff"))
ENV_FIELDS = [("name",), ("team",), ("image",), ("train", "max_steps"), ("train", "lr"), ("env", "X"),
              ("data", "train", 0), ("checkpoint", "dir"), ("slurm", "setup", 0), ("slurm", "qos"),
              ("slurm", "sbatch_args", "comment"), ("k8s", "namespace"), ("resources", "time_limit"),
              ("distributed", "nodes"), ("secrets", "TOKEN", "file")]


def test_deep_nesting_and_alias_bombs_are_refused_quickly(tmp_path: Path) -> None:
    """Regressions: 3,000 or 30,000 nested brackets ended in a RecursionError traceback after seconds of PyYAML's
    quadratic scanning; a recursive alias in a RecursionError; a billion laughs walked for minutes."""
    import time

    base = yaml.safe_dump(BASES[0])
    cases = {f"deep{d}": "env: {X: " + "[" * d + "]" * d + "}\n" for d in (3000, 30000)}
    cases.update(recursive="env: &r {X: *r}\n", merge="model: &m {<<: *m}\n", bomb=_billion_laughs(),
                 set_recursive="")
    for name, tail in cases.items():
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(base + tail)
        sets = ["env.X=[&a [*a]]"] if name == "set_recursive" else []
        started = time.monotonic()
        with pytest.raises(SpecError) as info:
            load_spec(spec, sets)
        assert time.monotonic() - started < 20, name
        [problem] = info.value.problems
        assert re.search(r"nests deeper|alias|repeat", problem.message), (name, problem.render())
        assert problem.source == (f"--set {sets[0]}" if sets else str(spec)) and (sets or problem.line), \
            problem.render()
        result = invoke(["validate", str(spec), *(x for s in sets for x in ("--set", s))])
        assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)


@given(st.sampled_from(BASES), st.lists(st.tuples(st.sampled_from(ENV_FIELDS), env_name, st.booleans(), text),
                                        min_size=1, max_size=2),
       st.dictionaries(env_name, env_value, max_size=3))
def test_env_interpolation(base: dict[str, Any], refs: list[tuple], environ: dict[str, str]) -> None:
    ran("${env:} interpolation")
    doc = copy.deepcopy(base)
    for path, name, with_default, default in refs:
        default = default.replace("}", "")
        ref = f"${{env:{name}:-{default}}}" if with_default else f"${{env:{name}}}"
        doc = put(doc, path, f"module load {ref}" if path[0] == "slurm" and path[1] == "setup" else ref)
    with tempfile.TemporaryDirectory() as tmp_:
        spec, profile = write_files(Path(tmp_), yaml.safe_dump(doc).encode())
        old = {k: os.environ.get(k) for k in ("MBL_FUZZ_A", "MBL_FUZZ_B", "MBL_FUZZ_UNSET")}
        try:
            for key in old:
                os.environ.pop(key, None)
            os.environ.update(environ)
            check_loaded(spec)
        finally:
            for key, item in old.items():
                os.environ.pop(key, None) if item is None else os.environ.__setitem__(key, item)
        env = {"MBL_FUZZ_A": None, "MBL_FUZZ_B": None, "MBL_FUZZ_UNSET": None, **environ}
        for cluster in ("--slurm", "--k8s"):
            result = invoke(["render", str(spec), cluster, "--profile", str(profile)], env=env)
            check_cli(result, [str(spec)], f"render {cluster} with {environ}", {str(spec)})


@given(mutated([PROFILE], PROFILE_PATHS).flatmap(as_yaml), st.sampled_from(BASES))
def test_cluster_profiles(raw: bytes, base: dict[str, Any]) -> None:
    ran("cluster profiles: load_profile, render --slurm / --k8s --profile")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        spec, _ = write_files(tmp, yaml.safe_dump(base).encode())
        profile = tmp / "profile.yaml"
        profile.write_bytes(raw)
        try:
            load_profile(profile)
        except MblError as exc:
            assert exc.exit_code == 2
            if isinstance(exc, SpecError):
                assert all(p.source == str(profile) for p in exc.problems), [p.render() for p in exc.problems]
        lined = {str(profile)} if has_content(raw) else set()
        for cluster in ("--slurm", "--k8s"):
            result = invoke(["render", str(spec), cluster, "--profile", str(profile)])
            if check_cli(result, [str(profile), str(spec)], f"render {cluster}", lined) == "ok" and cluster == "--k8s":
                assert not k8s_problems(list(yaml.safe_load_all(result.stdout)))


@given(mutated([POLICY], POLICY_PATHS).flatmap(as_yaml), st.sampled_from(BASES))
def test_quota_policies(raw: bytes, base: dict[str, Any]) -> None:
    ran("quota policies: load_policy, check_job, mbl validate / quota render / quota apply")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        policy = tmp / "policy.yaml"
        policy.write_bytes(raw)
        try:
            loaded = load_policy(policy)
        except SpecError as exc:
            assert all(p.source == str(policy) for p in exc.problems), [p.render() for p in exc.problems]
            loaded = None
        if loaded is not None:
            spec = JobSpec.model_validate({**base, "team": "nlp"})
            assert isinstance(check_job(spec, loaded, None, "gpu"), list)
        lined = {str(policy)} if has_content(raw) else set()
        check_cli(invoke(["validate", str(policy)]), [str(policy)], "validate POLICY", lined)
        result = invoke(["quota", "render", str(policy)])
        if check_cli(result, [str(policy)], "quota render", lined) == "ok":
            assert loaded is not None
            assert not k8s_problems(list(yaml.safe_load_all(result.stdout)))
        check_cli(invoke(["quota", "apply", str(policy)]), [str(policy)], "quota apply", lined)


FILE_KINDS = ["spec", "part", "extends", "extends", "extends", "missing", "dir", "dangling", "loop", "bytes",
              "empty", "list", "long-name"]


@given(st.lists(st.tuples(st.sampled_from(FILE_KINDS), st.integers(0, 4)), min_size=1, max_size=5))
def test_files_and_extends_chains(files: list[tuple[str, int]]) -> None:
    """Files that extend each other (cycles included), and files that are missing, directories, dangling
    symlinks, symlink loops, names too long, not UTF-8, empty, or no mapping."""
    ran("files: missing, unreadable, looping, extends chains and cycles")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        names = [tmp / ("x" * 300 + ".yaml" if kind == "long-name" else f"f{i}.yaml")
                 for i, (kind, _target) in enumerate(files)]
        for i, (kind, target) in enumerate(files):
            path, parent = names[i], names[target % len(names)].name
            if kind == "spec":
                path.write_text(yaml.safe_dump(BASES[target % len(BASES)]))
            elif kind == "part":
                path.write_text(f"extends: {parent}\ntrain: {{lr: 0.001}}\nname: part-{i}\n")
            elif kind == "extends":
                path.write_text(f"extends: {parent}\n")
            elif kind == "dir":
                path.mkdir()
            elif kind == "dangling":
                path.symlink_to(tmp / "nowhere.yaml")
            elif kind == "loop":
                path.symlink_to(path)
            elif kind == "bytes":
                path.write_bytes(b"kind: pretrain\nname: \xff\xfe\n")
            elif kind == "empty":
                path.write_text("")
            elif kind == "list":
                path.write_text("- kind: pretrain\n")
        sources = [str(p) for p in names] + [str(tmp / "nowhere.yaml")]  # where the dangling links point
        for path in names:
            check_cli(invoke(["validate", str(path)]), sources, f"validate {files}")
            check_cli(invoke(["render", str(path), "--k8s"]), sources, f"render --k8s {files}")
            check_loaded(path)
            with pytest.raises(MblError) if not _is_file(path) else _maybe():
                load_document(path, Profile, "cluster profile")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long
        return False


class _maybe:
    """A context that lets SpecError (exit 2) pass and nothing else."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, SpecError)


@given(st.one_of(
    st.lists(st.one_of(st.just("--help"), st.sampled_from(["-h", "--debug", "--version", "validate", "render", "submit",
                                                           "quota", "list", "status", "schema", "nope"]), text),
             max_size=4),
    st.builds(lambda since, by, out: ["quota", "report", "--cluster", "k8s", "--since", since, "--by", by, "-o", out],
              st.one_of(text, st.sampled_from(["2026-11-01", "2026-11-01T10:00", "2026-13-01", "yesterday"])),
              st.sampled_from(["team", "user", "job", "nope"]), st.sampled_from(["table", "csv", "json", "xml"])),
    st.builds(lambda shell: ["completion", shell], st.one_of(text, st.sampled_from(["bash", "zsh", "fish"]))),
    st.builds(lambda cmd, job, opts: [cmd, job, *opts], st.sampled_from(["status", "logs", "cancel"]),
              st.one_of(text, st.sampled_from(["#1", "1", "local-1", "-x"])),
              st.sampled_from([[], ["-o", "json"], ["-f"], ["--rank", "x"], ["-o", "yaml"]])),
))
def test_command_lines(argv: list[str]) -> None:
    """Arbitrary words on the command line, and the options of commands that need no cluster over an empty
    registry (`quota report --cluster k8s`, `status`/`logs`/`cancel` of a job, `completion`): exit 0 or a usage
    error (exit 2), never a traceback.
    Commands that talk to a cluster or start a job are left out (they are not input validation)."""
    assume(argv[:2] == ["quota", "report"] or argv[0:1] in (["status"], ["logs"], ["cancel"]) and len(argv) > 1
           or not {"submit", "status", "list", "quota", "logs", "cancel"} & set(argv) or "--help" in argv or "-h" in argv)
    assume("--debug" not in argv)
    ran("command lines: arbitrary words; quota report, completion, status/logs/cancel options")
    result = invoke(argv)
    check_cli(result, argv, f"mbl {argv}")


# ---- what the fuzzer found, pinned (CI's examples are drawn, these always run) -------------------------------

TINY = (REPO / "examples" / "pretrain-tiny.yaml").read_text()
K8S = "extends: base.yaml\nimage: x\ncheckpoint: {dir: /shared/r}\ndata: {train: [/shared/a]}\n"
FOUND = [
    # (what, files {name: text or bytes}, argv after the command, the error must contain)
    ("an empty file named <spec>", {"s.yaml": ""}, ["validate", "{s.yaml}"], "s.yaml: kind: is required"),
    ("bytes that are no UTF-8", {"s.yaml": b"kind: pretrain\nname: \xff\n"}, ["validate", "{s.yaml}"],
     "s.yaml:2: (spec): is not UTF-8"),
    ("a recursive alias", {"s.yaml": TINY + "env: &r {X: *r}\n"}, ["validate", "{s.yaml}"], "alias"),
    ("a NUL in extends", {"s.yaml": 'extends: "a\\0b"\n'}, ["validate", "{s.yaml}"], "NUL"),
    ("a symlink loop, named relative", {"s.yaml": "->s.yaml"}, ["validate", "s.yaml"], "cannot read the spec"),
    ("a lone surrogate", {"s.yaml": TINY + 'env: {X: "a\\ud800"}\n'}, ["render", "--slurm", "{s.yaml}"],
     "surrogate"),
    ("an infinite number", {"s.yaml": TINY.replace("lr: 0.002", "lr: 0.002\n  weight_decay: .inf")},
     ["render", "{s.yaml}"], "train.weight_decay: Input should be a finite number"),
    ("an integer beyond 64 bits", {"s.yaml": TINY}, ["validate", "{s.yaml}", "--set", "train.seed=" + "9" * 30],
     "64 bits"),
    ("a time limit beyond 32 bits", {"s.yaml": TINY}, ["validate", "{s.yaml}", "--set",
                                                       "resources.time_limit=99999999999"], "resources.time_limit"),
    ("betas out of range", {"s.yaml": TINY}, ["validate", "{s.yaml}", "--set", "train.betas=[1, 2]"], "train.betas"),
    ("-o under a file", {"s.yaml": TINY}, ["render", "{s.yaml}", "-o", "{s.yaml}/sub"], "-o/--output"),
    ("a recursive alias in --set", {"s.yaml": TINY}, ["validate", "{s.yaml}", "--set", "env.X=[&a [*a]]"], "alias"),
    ("a cycle of extends, at its line", {"s.yaml": "extends: s.yaml\n"}, ["validate", "{s.yaml}"],
     "s.yaml:1: extends: `extends` makes a cycle"),
    ("a missing parent, at the extends line", {"s.yaml": "kind: pretrain\nextends: no.yaml\n"},
     ["validate", "{s.yaml}"], "s.yaml:2: extends: cannot read"),
    ("an unknown key that is no name, quoted", {"s.yaml": TINY + "'${env:HOME}': 1\n"}, ["validate", "{s.yaml}"],
     "'${env:HOME}': unknown key"),
    ("a newline into #SBATCH", {"s.yaml": TINY}, ["render", "--slurm", "{s.yaml}", "--set", "slurm.qos=x\ntouch y #"],
     "slurm.qos: contains a line break"),
    ("a setup line that opens a quote", {"s.yaml": TINY}, ["render", "--slurm", "{s.yaml}", "--set",
                                                           "slurm.setup=[\"echo 'a\"]"], "slurm.setup"),
    ("a queue Kubernetes refuses", {"base.yaml": TINY, "s.yaml": K8S + "k8s: {queue: Bad_Q}\n"},
     ["render", "--k8s", "{s.yaml}"], "k8s.queue"),
    ("a node selector Kubernetes refuses", {"base.yaml": TINY, "s.yaml": K8S + "k8s: {node_selector: {a b: c}}\n"},
     ["render", "--k8s", "{s.yaml}"], "k8s.node_selector"),
    ("a secret name Kubernetes refuses", {"base.yaml": TINY, "s.yaml": K8S + "secrets: {T: {secret: A_B, key: k}}\n"},
     ["render", "--k8s", "{s.yaml}"], "secrets"),
    ("a team namespace Kubernetes refuses", {"p.yaml": "teams: {nlp: {gpus: 1, namespace: Bad_NS}}\n"},
     ["quota", "render", "{p.yaml}"], "namespace"),
    ("a profile setup line that opens a quote", {"s.yaml": TINY, "p.yaml": "slurm: {setup: [\"echo 'a\"]}\n"},
     ["render", "--slurm", "{s.yaml}", "--profile", "{p.yaml}"], "p.yaml:1: slurm.setup"),
]


@pytest.mark.parametrize("what, files, argv, expected", FOUND, ids=[f[0] for f in FOUND])
def test_what_the_fuzzer_found_stays_fixed(tmp_path: Path, what: str, files: dict[str, Any], argv: list[str],
                                           expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ended in a traceback (or, for the names, labels and the #SBATCH line break, in a job script or
    objects that break) before the fix; now a clean exit 2 that names the file, line and field."""
    monkeypatch.chdir(tmp_path)  # where a name given without its folder is
    for name, content in files.items():
        if isinstance(content, str) and content.startswith("->"):
            (tmp_path / name).symlink_to(tmp_path / content[2:])
        elif isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    args = []
    for arg in argv:
        for name in files:
            arg = arg.replace("{" + name + "}", str(tmp_path / name))
        args.append(arg)
    result = invoke(args, env={"HOME": str(tmp_path)})
    sources = [str(tmp_path / n) for n in files] + list(files)
    check_cli(result, sources, what, set())
    assert result.exit_code == 2 and expected in result.stderr, (what, result.stderr)
