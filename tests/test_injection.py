"""Injection: values carrying `$(...)`, backticks, `;`, `&&`, pipes, newlines and quotes, in every field that
reaches a shell script, an #SBATCH line, a command line or a Kubernetes object, are either rejected at
validation (exit 2, the field named) or quoted, so that nothing injected executes.

Slurm: each rendered batch script runs with bash in a scratch directory, with srun, scontrol, scancel,
sbatch, squeue, sacct, podman, apptainer and enroot stubbed (small scripts on PATH that log their argv and
environment); every payload tries to `touch` a canary file, which must never appear. Quoted values must
arrive intact: an env value is the very string in srun's environment. The local backend's command line
(what `mbl render` prints) runs the same way with a stubbed `python`.

Setup lines (`slurm.setup` of a spec or a cluster profile) are shell code the user writes and runs as
written, by design; what is tested for them is that one line cannot break the script around it (line
breaks, an open quote, a trailing backslash, a here-document are refused) and that `${env:NAME}` cannot
bring shell syntax into one.

Kubernetes (hypothesis): for hostile names, namespaces, queues, labels, selectors, tolerations, secrets,
profiles and quota policies, `mbl render --k8s` and `mbl quota render` either refuse (exit 2) or write
objects whose names, namespaces, label keys and values, annotation keys and references are all valid.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fuzz_util import check_cli, k8s_problems, ran, text
from pydantic import ValidationError

from launcher.backends import slurm_render
from launcher.backends.local import LocalBackend
from launcher.backends.slurm import SlurmBackend
from launcher.cli import cli
from launcher.errors import MblError, SpecError
from launcher.loading import Origins, explain, load_spec, validate_data
from launcher.profile import Profile

REPO = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/mbl-project/mbl-trainer:0.1.0"
STUBS = ["srun", "scontrol", "scancel", "sbatch", "squeue", "sacct", "podman", "apptainer", "enroot", "python",
         "module"]
STUB = """#!/bin/bash
# a stubbed cluster command: log argv (NUL-separated) and the environment, print what the script expects
log="${MBL_STUB_LOG}/${0##*/}.$$"
printf '%s\\0' "$@" > "${log}.argv"
case "${0##*/}" in
  srun|python) env -0 > "${log}.env" ;;
  scontrol) [[ "$1" == show ]] && echo node1 ;;
esac
exit 0
"""


def payloads(canary: Path) -> dict[str, str]:
    """Each tries to create `canary` (an absolute path without spaces, quotes or dots) if the shell runs it."""
    c = str(canary)
    return {
        "dollar": f"$(touch {c})", "backtick": f"`touch {c}`", "semicolon": f"x; touch {c}",
        "newline": f"x\ntouch {c}", "crlf": f"x\r\ntouch {c}", "single-quote": f"x' ; touch {c} ; '",
        "double-quote": f'x" ; touch {c} ; "', "and": f"x && touch {c}", "pipe": f"x | touch {c}",
        "ifs": f"$(touch${{IFS}}{c})", "process": f"<(touch {c})", "nested": f"\"'$(touch {c})'\"",
        "comment-break": f"x #\ntouch {c}", "escaped": f"x\\'; touch {c}; \\'",
    }


def _base(scratch: Path, runtime: str = "none") -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "pretrain-tiny.yaml").read_text())
    doc.update(name="inj", image=IMAGE)
    doc["checkpoint"]["dir"] = str(scratch / "shared" / "runs" / "{name}")
    doc["data"]["train"] = [str(scratch / "shared" / "corpus.txt")]
    doc["slurm"] = {"container_runtime": runtime}
    return doc


PROFILE = {"slurm": {"version": "23.11", "partitions": [{"name": "gpu", "gpu_types": ["fake"], "default": True}],
                     "container_runtime": "none", "shared_root": "/shared", "setup": ["module load cuda/12.4"]}}

# field -> (where a payload goes: a spec path, `{payload}` for a key; the run group (container runtime); what an
# error about it names). Fields of one group go into one script together, each payload aimed at its own canary.
SPEC_FIELDS: dict[str, tuple[tuple, str, str]] = {
    "name": (("name",), "none", "name"),
    "team": (("team",), "none", "team"),
    "env value": (("env", "X"), "none", "env"),
    "env name": (("env", "{payload}"), "none", "env"),
    "checkpoint.dir": (("checkpoint", "dir"), "none", "checkpoint.dir"),
    "data.train": (("data", "train", 0), "none", "data.train"),
    "data.tokenizer": (("data", "tokenizer"), "none", "data.tokenizer"),
    "model.init_from": (("model", "init_from"), "none", "model.init_from"),
    "slurm.sbatch_args value": (("slurm", "sbatch_args", "comment"), "none", "slurm.sbatch_args"),
    "slurm.sbatch_args name": (("slurm", "sbatch_args", "{payload}"), "none", "slurm.sbatch_args"),
    "slurm.partition": (("slurm", "partition"), "none", "slurm.partition"),
    "slurm.account": (("slurm", "account"), "none", "slurm.account"),
    "slurm.qos": (("slurm", "qos"), "none", "slurm.qos"),
    "slurm.constraint": (("slurm", "constraint"), "none", "slurm.constraint"),
    "resources.gpu_type": (("resources", "gpu_type"), "none", "resources.gpu_type"),
    "image (pyxis)": (("image",), "pyxis", "image"),
    "slurm.container_mounts (pyxis)": (("slurm", "container_mounts", 0), "pyxis", "slurm.container_mounts"),
    "image (apptainer)": (("image",), "apptainer", "image"),
    "slurm.container_mounts (apptainer)": (("slurm", "container_mounts", 0), "apptainer", "slurm.container_mounts"),
    "secrets file": (("secrets", "TOKEN", "file"), "secrets", "secrets"),
}
PROFILE_FIELDS: dict[str, tuple[tuple, str, str]] = {
    "profile partition": (("slurm", "partitions", 0, "name"), "none", "slurm.partitions"),
    "profile default_account": (("slurm", "default_account"), "none", "slurm.default_account"),
    "profile default_qos": (("slurm", "default_qos"), "none", "slurm.default_qos"),
    "profile account of a team": (("slurm", "accounts", "default"), "none", "slurm.accounts"),
    # the job's paths move under it (the spec names them first when the payload is refused)
    "profile shared_root": (("slurm", "shared_root"), "pyxis", "slurm.shared_root|checkpoint.dir"),
}
RUNTIMES = {"none": "none", "secrets": "none", "pyxis": "pyxis", "apptainer": "apptainer"}


def apply(field: str, payload: str, doc: dict[str, Any], profile: dict[str, Any]) -> str:
    """Put `payload` into `field` of the spec or the profile (and what makes it reach the script); its group."""
    if field in SPEC_FIELDS:
        path, group, _ = SPEC_FIELDS[field]
        put(doc, tuple(payload if p == "{payload}" else p for p in path), payload)
        if field == "slurm.partition":  # a partition the profile lists, or it is refused for that alone
            profile["slurm"]["partitions"].append({"name": payload})
        if field == "resources.gpu_type":
            profile["slurm"]["partitions"][0]["gpu_types"].append(payload)
    else:
        path, group, _ = PROFILE_FIELDS[field]
        if field == "profile shared_root":  # an absolute path that carries the payload, the job's paths under it
            payload = doc["checkpoint"]["dir"].split("/runs/")[0] + "/" + payload
            doc["checkpoint"]["dir"] = payload + "/runs/{name}"
            doc["data"]["train"] = [payload + "/corpus.txt"]
        put(profile, path, payload)
    return group


def put(doc: Any, path: tuple, item: Any) -> None:
    for part in path[:-1]:
        if isinstance(doc, list):
            doc = doc[part]
        else:
            doc = doc.setdefault(part, [] if part in ("train", "container_mounts", "setup", "partitions") else {})
    if isinstance(doc, list):
        doc[:] = doc[:path[-1]] + [item]
    else:
        doc[path[-1]] = item


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the scripts, their canaries and the stubbed commands (its path: no spaces, quotes or dots)."""
    root = tmp_path_factory.mktemp("injection")
    assert not set(" '\".") & set(str(root)), root
    stubs = root / "stubs"
    stubs.mkdir()
    for name in STUBS:
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    (root / "shared").mkdir()
    (root / "shared" / "corpus.txt").write_text("text\n")
    return root


def run_script(scratch: Path, script: str, case: str) -> Path:
    """Run a rendered batch script with bash, as slurmstepd would (a fresh directory, stubbed commands)."""
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="run"))
    logs = work / "stub-logs"
    logs.mkdir()
    path = work / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, f"{case}: bash -n: {syntax.stderr}\n{script}"
    env = {"PATH": f"{scratch / 'stubs'}:/usr/bin:/bin", "HOME": str(work), "MBL_STUB_LOG": str(logs),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(work),
           "SLURM_NNODES": "1"}
    subprocess.run(["bash", str(path)], cwd=work, env=env, capture_output=True, timeout=60)
    return logs


def stub_calls(logs: Path, name: str) -> list[tuple[list[str], dict[str, str]]]:
    calls = []
    for argv in sorted(logs.glob(f"{name}.*.argv")):
        words = argv.read_bytes().split(b"\0")[:-1]
        env_file = argv.with_suffix(".env")
        raw = env_file.read_bytes() if env_file.exists() else b""
        env = dict(e.split(b"=", 1) for e in raw.split(b"\0") if b"=" in e)
        calls.append(([w.decode(errors="surrogateescape") for w in words],
                      {k.decode(): v.decode(errors="surrogateescape") for k, v in env.items()}))
    return calls


def render_slurm(doc: dict[str, Any], profile: dict[str, Any], base: Path) -> str:
    """The batch script of a spec and a profile, both validated by the loader's rules (in memory: fast)."""
    spec = validate_data(doc, Origins()).resolved(base)
    try:
        prof = Profile.model_validate(profile)
    except ValidationError as exc:
        raise SpecError(explain(exc, profile, Origins(), Profile)) from None
    return slurm_render.script(spec, prof.slurm)


KINDS = list(payloads(Path("/x")))
CASES = [(field, kind) for field in [*SPEC_FIELDS, *PROFILE_FIELDS] for kind in KINDS]


def fresh(scratch: Path, group: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A spec and a profile that render for the group's container runtime (the job's paths on shared_root)."""
    doc, profile = _base(scratch, RUNTIMES[group]), copy.deepcopy(PROFILE)
    if RUNTIMES[group] != "none":
        profile["slurm"]["shared_root"] = str(scratch / "shared")
    return doc, profile


def _named(field: str) -> str:
    return (SPEC_FIELDS.get(field) or PROFILE_FIELDS[field])[2]


def test_slurm_scripts_never_run_an_injected_payload(scratch: Path) -> None:
    """Every field x payload: rejected with the field named, or rendered, run with bash, and never executed.

    Each case is validated and rendered alone; the accepted ones of a payload kind then go into one script
    together (per container runtime), each aimed at a canary of its own, and that script runs."""
    rejected, accepted = [], []
    for field, kind in CASES:
        group = (SPEC_FIELDS.get(field) or PROFILE_FIELDS[field])[1]
        doc, profile = fresh(scratch, group)
        apply(field, payloads(scratch / "never")[kind], doc, profile)
        try:
            render_slurm(doc, profile, scratch)
        except MblError as exc:
            assert exc.exit_code == 2, (field, kind)
            said = exc.render() + (exc.hint or "")
            assert any(name in said for name in _named(field).split("|")), f"{field} <- {kind}: names no " \
                                                                            f"{_named(field)}: {said}"
            rejected.append((field, kind))
            continue
        accepted.append((field, kind, group))
    runs = 0
    for kind in KINDS:
        for group in RUNTIMES:
            fields = [f for f, k, g in accepted if k == kind and g == group]
            if not fields:
                continue
            doc, profile = fresh(scratch, group)
            canaries, sent = {}, {}
            for i, field in enumerate(fields):
                canaries[field] = scratch / f"pwned-{kind}-{group}-{i}"
                sent[field] = payloads(canaries[field])[kind]
                apply(field, sent[field], doc, profile)
            case = f"{kind} into {', '.join(fields)}"
            script = render_slurm(doc, profile, scratch)
            logs = run_script(scratch, script, case)
            runs += 1
            ran_payload = [f for f, c in canaries.items() if c.exists()]
            assert not ran_payload, f"{case}: the payload in {ran_payload} ran\n{script}"
            srun = stub_calls(logs, "srun")
            if group == "secrets":  # the file does not exist: the script stops reading it (set -e), before srun
                assert not srun and "cat " in script
                continue
            assert len(srun) == 1, f"{case}: the script never reached srun\n{script}"
            argv, env = srun[0]
            if "env value" in sent:
                assert env["X"] == sent["env value"], f"{case}: the env value changed on its way"
            if "checkpoint.dir" in sent:
                assert any(w.endswith("/spec.yaml") and sent["checkpoint.dir"].replace("{name}", "inj") in w
                           for w in argv), f"{case}: {argv}"
            for field in ("slurm.container_mounts (pyxis)", "slurm.container_mounts (apptainer)"):
                if field in sent:
                    assert any(sent[field] in w for w in argv), f"{case}: {argv}"
    print(f"injection (Slurm): {len(CASES)} field x payload cases: {len(rejected)} rejected at validation with the "
          f"field named, {len(accepted)} rendered and run with bash ({runs} scripts), no payload executed")
    # quoting, not rejection, for the values that may carry anything: env values, paths, option values
    quoted = {f for f, _k, _g in accepted}
    assert {"env value", "checkpoint.dir", "data.train", "slurm.sbatch_args value", "slurm.qos",
            "slurm.container_mounts (pyxis)", "secrets file", "profile default_qos"} <= quoted, quoted
    assert {"name", "env name", "slurm.sbatch_args name"} & {f for f, _k in rejected}


QUOTED_SETS = ("env.X", "slurm.qos", "slurm.sbatch_args.comment", "data.train", "checkpoint.dir")


def _set_value(key: str, payload: str) -> str:
    if key in ("data.train", "slurm.setup"):  # lists: a flow sequence of one string (JSON is YAML)
        return json.dumps([payload])
    return payload


def test_overrides_on_the_command_line_never_run(scratch: Path) -> None:
    """The same payloads as `--set` overrides through `mbl render --slurm -o DIR`, the script then run."""
    spec, profile = scratch / "set-spec.yaml", scratch / "set-profile.yaml"
    spec.write_text(yaml.safe_dump(_base(scratch)))
    profile.write_text(yaml.safe_dump(PROFILE))

    def render(sets: dict[str, str]) -> tuple[Any, Path]:
        out = Path(tempfile.mkdtemp(dir=scratch, prefix="out"))
        args = ["render", str(spec), "--slurm", "--profile", str(profile), "-o", str(out)]
        for key, item in sets.items():
            args += ["--set", f"{key}={_set_value(key, item)}"]
        result = CliRunner().invoke(cli, args)
        check_cli(result, [str(spec), str(profile)], f"--set {sets}")
        return result, out

    ran_ = refused = 0
    for kind in KINDS:
        canaries = {key: scratch / f"pwned-set-{kind}-{i}" for i, key in enumerate(QUOTED_SETS)}
        sent = {key: payloads(canaries[key])[kind] for key in QUOTED_SETS}
        # absolute, or it resolves against the current directory, where the script's `mkdir -p` would make it
        sent["checkpoint.dir"] = f"{scratch}/set-runs/{sent['checkpoint.dir']}"
        one_line = "\n" not in sent["env.X"] and "\r" not in sent["env.X"]
        result, out = render(sent if one_line else {"env.X": sent["env.X"]})
        if "\r" in sent["env.X"]:  # a control character: refused, naming the option and the field
            assert result.exit_code == 2 and "--set env.X=" in result.stderr and "env" in result.stderr
            refused += 1
            continue
        assert result.exit_code == 0, (kind, result.stderr)
        logs = run_script(scratch, (out / "job.sbatch").read_text(), f"--set {kind}")
        assert not [k for k, c in canaries.items() if c.exists()], f"{kind}: a payload ran"
        [(argv, env)] = stub_calls(logs, "srun")
        assert env["X"] == sent["env.X"]
        ran_ += 1
        if not one_line:  # the other fields hold one line: a line break is refused, naming each
            result, _out = render({k: v for k, v in sent.items() if k != "env.X"})
            assert result.exit_code == 2
            for key in ("slurm.qos", "slurm.sbatch_args.comment", "data.train", "checkpoint.dir"):
                assert f"--set {key}=" in result.stderr, (key, result.stderr)
            refused += 1
        result, _out = render({"name": payloads(scratch / "never")[kind]})
        assert result.exit_code == 2 and "--set name=" in result.stderr
        result, _out = render({"slurm.setup": payloads(scratch / "never")[kind]})
        assert (result.exit_code == 2) == (not one_line), (kind, result.stderr)  # code: refused if not one line
        refused += 1
    print(f"injection (--set): {ran_} renders with payloads in {len(QUOTED_SETS)} fields run with bash, "
          f"{refused} overrides refused")


def test_setup_lines_run_as_written_and_cannot_break_the_script(scratch: Path) -> None:
    """Setup lines are the user's shell code (modules, a venv): one runs as written. One that would run into the
    script's lines after it (a line break, an open quote, a trailing backslash, a here-document) is refused,
    in a spec and in a cluster profile, naming the field."""
    canary = scratch / "setup-ran"
    doc, profile = fresh(scratch, "none")
    doc["slurm"]["setup"] = [f"touch {canary}"]
    logs = run_script(scratch, render_slurm(doc, profile, scratch), "setup")
    assert canary.exists() and stub_calls(logs, "srun") and [w for w, _e in stub_calls(logs, "module")]
    for line in ["echo a\ntouch b", "echo a\r", "echo 'open", 'echo "open', "echo x \\", "cat <<EOF",
                 "echo $(", "echo `x"]:
        for target in ("spec", "profile"):
            doc, profile = fresh(scratch, "none")
            (doc if target == "spec" else profile)["slurm"]["setup"] = ["true", line]
            with pytest.raises(SpecError) as info:
                render_slurm(doc, profile, scratch)
            assert info.value.problems[0].path[:2] == ("slurm", "setup"), (line, info.value.render())


def test_env_interpolation_cannot_put_shell_syntax_into_setup_lines(scratch: Path, monkeypatch) -> None:
    """`${env:NAME}` in a setup line (spec or cluster profile): a plain value goes in; shell syntax is refused."""
    canary = scratch / "pwned-env"
    spec, profile = scratch / "env-spec.yaml", scratch / "env-profile.yaml"
    doc = _base(scratch)
    doc["slurm"]["setup"] = ["module load ${env:MBL_INJ_MODULE}"]
    spec.write_text(yaml.safe_dump(doc))
    prof = copy.deepcopy(PROFILE)
    prof["slurm"]["setup"] = ["source ${env:MBL_INJ_VENV:-/opt/venv}/bin/activate"]
    profile.write_text(yaml.safe_dump(prof))
    monkeypatch.setenv("MBL_INJ_MODULE", "cuda/12.4")
    monkeypatch.setenv("MBL_INJ_VENV", "/opt/venv-2")
    script = SlurmBackend(profile=str(profile)).dryrun(load_spec(spec).resolved(scratch)).files["job.sbatch"]
    assert "module load cuda/12.4" in script and "source /opt/venv-2/bin/activate" in script
    for kind, payload in payloads(canary).items():
        for var, target in (("MBL_INJ_MODULE", spec), ("MBL_INJ_VENV", profile)):
            monkeypatch.setenv(var, payload.replace("\x00", ""))
            with pytest.raises(SpecError) as info:
                SlurmBackend(profile=str(profile)).dryrun(load_spec(spec).resolved(scratch))
            [problem] = info.value.problems
            assert problem.path[:2] == ("slurm", "setup") and var in problem.message, problem.render()
            assert problem.source == str(target) and problem.line, problem.render()
            monkeypatch.setenv(var, "cuda")
    assert not canary.exists()


def test_local_command_line_never_runs_a_payload(scratch: Path) -> None:
    """What `mbl render` prints for the local backend (env assignments, then the command) run by bash with a
    stubbed `python`: the env values arrive intact, nothing executes."""
    canary = scratch / "pwned-local"
    for kind, payload in payloads(canary).items():
        doc = _base(scratch)
        doc["env"] = {"X": payload}
        doc["checkpoint"]["dir"] = str(scratch / "local" / kind / payload.replace("\n", " ").replace("\r", " "))
        spec_file = scratch / "local.yaml"
        spec_file.write_text(yaml.safe_dump(doc))
        if "\r" in payload:  # a control character: refused, whatever the field
            with pytest.raises(SpecError) as info:
                load_spec(spec_file)
            assert [p.path for p in info.value.problems] == [("env",)], info.value.render()
            continue
        request = LocalBackend().dryrun(load_spec(spec_file).resolved(scratch))
        line = request.command_line()
        logs = Path(tempfile.mkdtemp(dir=scratch, prefix="local"))
        env = {"PATH": f"{scratch / 'stubs'}:/usr/bin:/bin", "MBL_STUB_LOG": str(logs)}
        proc = subprocess.run(["bash", "-c", line], cwd=scratch, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{kind}: {proc.stderr}"
        assert not canary.exists(), f"{kind}: the payload ran: {line}"
        [(argv, seen)] = stub_calls(logs, "python")
        assert seen["X"] == payload and argv == request.command[1:], kind
        assert f"{request.spec.run_dir}/spec.yaml" in argv


# ---- Kubernetes: names, labels and annotations always valid ---------------------------------------------------

dns = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
k8s_value = st.one_of(dns, dns, st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
                      st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?", fullmatch=True), text,
                      st.sampled_from(["", "a_b.c", "A", "a" * 63, "a" * 64, "-a", "a-", "a/b", "a.b/c",
                                                  "example.com/key", "x" * 254, "ns;rm", "$(id)", "a b", "ä"]))
K8S_FIELDS = [("name",), ("team",), ("kind",), ("k8s", "namespace"), ("k8s", "queue"), ("k8s", "priority_class"),
              ("k8s", "service_account"), ("k8s", "pvc"), ("k8s", "image_pull_secrets", 0),
              ("k8s", "node_selector", "{key}"), ("k8s", "tolerations", 0, "key"), ("k8s", "tolerations", 0, "value"),
              ("secrets", "{key}", "secret"), ("secrets", "TOKEN", "key"), ("env", "{key}"), ("resources", "gpu_type")]
PROFILE_K8S = [("k8s", "gpu_types", "h100", "node_selector", "{key}"), ("k8s", "gpu_types", "h100", "resource"),
               ("k8s", "gpu_types", "h100", "tolerations", 0, "key"), ("k8s", "gpu_types", "{key}", "resource")]


def _k8s_spec() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "pretrain.yaml").read_text())
    doc.setdefault("secrets", {})["TOKEN"] = {"secret": "hf-token", "key": "token"}
    doc["resources"]["gpu_type"] = "h100"
    doc["k8s"] = {**(doc.get("k8s") or {}), "tolerations": [{"key": "dedicated", "operator": "Exists"}]}
    return doc


def _put_k8s(doc: dict[str, Any], path: tuple, item: str, key: str) -> None:
    node: Any = doc
    path = tuple(key if p == "{key}" else p for p in path)
    for part in path[:-1]:
        if isinstance(node, list):
            node = node[part]
        else:
            node = node.setdefault(part, [{"key": "k"}] if part == "tolerations" else {})
    if isinstance(node, list):
        node[path[-1]] = item
    else:
        node[path[-1]] = item


@given(st.lists(st.tuples(st.sampled_from(K8S_FIELDS + PROFILE_K8S), k8s_value, k8s_value), min_size=1, max_size=3),
       st.one_of(st.none(), k8s_value), st.sampled_from(["pytorchjob", "trainjob"]))
def test_k8s_names_labels_annotations_are_valid(changes: list[tuple], namespace: str | None, api: str) -> None:
    ran("Kubernetes: hostile names, labels, selectors -> valid objects or exit 2")
    doc, profile = _k8s_spec(), {"k8s": {"gpu_types": {"h100": {"node_selector": {"pool": "gpu"}}}}}
    doc.setdefault("k8s", {})["api"] = api
    for path, item, key in changes:
        _put_k8s(profile if path in PROFILE_K8S else doc, path, item, key)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, profile_file = Path(tmp) / "spec.yaml", Path(tmp) / "profile.yaml"
        spec_file.write_text(yaml.safe_dump(doc))
        profile_file.write_text(yaml.safe_dump(profile))
        args = ["render", str(spec_file), "--k8s", "--profile", str(profile_file)]
        if namespace is not None:
            args += ["-n", namespace]
        result = CliRunner().invoke(cli, args)
        if check_cli(result, [str(spec_file), str(profile_file)], f"{changes} -n {namespace!r}") == "ok":
            objects = list(yaml.safe_load_all(result.stdout))
            assert len(objects) == 2
            problems = k8s_problems(objects)
            assert not problems, problems


@given(st.lists(st.tuples(st.sampled_from(["name", "namespace", "queue"]), k8s_value), min_size=1, max_size=3))
def test_quota_objects_are_valid(changes: list[tuple[str, str]]) -> None:
    ran("Kubernetes: hostile quota policies -> valid objects or exit 2")
    policy: dict[str, Any] = {"teams": {"nlp": {"gpus": 4, "namespace": "nlp", "queues": ["nlp"]}}}
    for what, item in changes:
        team = next(iter(policy["teams"]))
        if what == "name":
            policy["teams"][item] = policy["teams"].pop(team)
        elif what == "namespace":
            policy["teams"][team]["namespace"] = item
        else:
            policy["teams"][team]["queues"].append(item)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        result = CliRunner().invoke(cli, ["quota", "render", str(path)])
        if check_cli(result, [str(path)], f"{policy}") == "ok":
            problems = k8s_problems(list(yaml.safe_load_all(result.stdout)))
            assert not problems, problems


def test_valid_but_unusual_kubernetes_values_are_accepted(tmp_path: Path) -> None:
    """The rules are Kubernetes' own, not stricter: dots, underscores, prefixes and upper case where allowed."""
    doc = _k8s_spec()
    doc["k8s"].update(queue="team-a.q", priority_class="mbl.high-priority", image_pull_secrets=["reg.cred"],
                      node_selector={"example.com/Pool_Name": "A_b.c-9", "zone": ""},
                      tolerations=[{"key": "example.com/dedicated", "operator": "Equal", "value": "ML_team"}])
    doc.setdefault("secrets", {})["TOKEN"] = {"secret": "hf.token", "key": "HF_TOKEN.v1"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(cli, ["render", str(spec_file), "--k8s"])
    assert result.exit_code == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert not k8s_problems(objects)
    pod = objects[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"]["example.com/Pool_Name"] == "A_b.c-9"


def test_the_stubs_see_what_bash_runs(scratch: Path) -> None:
    """The harness itself: a script that does run a payload is caught (the canary appears)."""
    canary = scratch / "pwned-harness"
    logs = run_script(scratch, f"#!/bin/bash\nX=$(touch {shlex.quote(str(canary))})\nsrun a 'b c'\n", "harness")
    assert canary.exists()
    assert stub_calls(logs, "srun")[0][0] == ["a", "b c"]
    os.remove(canary)
    assert stat.S_ISREG(os.stat(scratch / "stubs" / "srun").st_mode)
