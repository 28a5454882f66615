"""What the fuzz, injection and secrets tests share: the hypothesis profiles, the example counters that
conftest.py prints at the end, hostile values, and the oracle of a CLI run (exit 0, or exit 2 that names where
and what; never a traceback).

Profiles (MBL_FUZZ_PROFILE): `ci` (the default: 40 examples per test, 360 in all, the same ones every run) and
`long` (1,200 per test, 10,800 in all, fresh ones every run; MBL_FUZZ_EXAMPLES sets the number per test), to
run by hand:

    MBL_FUZZ_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py tests/test_injection.py -q
"""

from __future__ import annotations

import os
import re
import traceback
import typing
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from pydantic import BaseModel

settings.register_profile(
    "ci", max_examples=int(os.environ.get("MBL_FUZZ_EXAMPLES", 40)), deadline=None, database=None,
    derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(  # 9 property tests x 1,200 = 10,800 examples
    "long", max_examples=int(os.environ.get("MBL_FUZZ_EXAMPLES", 1_200)), deadline=None, database=None,
    print_blob=True, suppress_health_check=list(HealthCheck),
)
PROFILE = os.environ.get("MBL_FUZZ_PROFILE", "ci")
settings.load_profile(PROFILE)

# test name -> examples run (bodies executed, shrinking included), and how their runs of mbl ended ("ok" or
# "refused"), so that a property that only ever sees refusals shows; printed by conftest.py's terminal summary
EXAMPLES: Counter[str] = Counter()
OUTCOMES: dict[str, Counter[str]] = {}
_CURRENT = [""]


def ran(name: str) -> None:
    EXAMPLES[name] += 1
    _CURRENT[0] = name


# ---- hostile values --------------------------------------------------------------------------------

CANARY = "MBL_CANARY"  # injection payloads touch "$MBL_CANARY_DIR/<this>"; see test_injection.py
SHELL_PAYLOADS = [
    "$(touch pwned-dollar)", "`touch pwned-backtick`", "x; touch pwned-semicolon", "x\ntouch pwned-newline",
    "x' ; touch pwned-squote ; '", 'x" ; touch pwned-dquote ; "', "x && touch pwned-and", "x | touch pwned-pipe",
    "${IFS}touch${IFS}pwned-ifs", "x\r\ntouch pwned-crlf", "$((1+1))", "*", "~root", "-rf", "--help",
    "a\\", "\\\n", "#SBATCH --x", "x # comment", "$HOME", "${PATH}", "!!", "<(touch pwned-procsub)",
]
WEIRD_STRINGS = [
    "", " ", "\t", "\x00", "\x07", "\x1b[31m", "\x7f", "\ud800", "\ufeff", "\u202e", "é", "日本語", "🚀", "a" * 300,
    "null", "~", "true", "no", "0x10", "1e400", "-1", ".inf", ".nan", "{}", "[]", "{a: 1}", "&a [*a]", "*a",
    "!!python/object:os.system", "%TAG", "---", "...", "? x", "- a", "key: value", "Bad_NS", "UPPER", "a/b",
    "a..b", "-leading", "trailing-", "a.b.c", "${env:HOME}", "${env:NOPE_NOT_SET}", "${env:X:-}", "${env:",
    "{name}", "/shared/../etc", "../../etc/passwd", "/", "//", "a:b:c", "x,y", "x;y", "10G", "480G", "04:00:00",
]
HOSTILE_STRINGS = WEIRD_STRINGS + SHELL_PAYLOADS
HOSTILE_INTS = [0, -1, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
HOSTILE_FLOATS = [0.0, -0.0, 1e-320, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 0.5, 1.0, 2.0]

text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.from_regex(r"[a-z][-a-z0-9]{0,12}[a-z0-9]", fullmatch=True),
)
scalar = st.one_of(
    text, st.sampled_from(HOSTILE_INTS), st.integers(), st.sampled_from(HOSTILE_FLOATS), st.floats(), st.booleans(),
    st.none(),
)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(text, inner, max_size=3)), max_leaves=8)


def nested(depth: int, leaf: Any = 1) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


# ---- the models' fields ----------------------------------------------------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def field_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field of a model, sections and leaves, as paths (`("train", "lr")`)."""
    out = []
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        out.append(path)
        sub = _submodel(info.annotation)
        if sub is not None and typing.get_origin(info.annotation) not in (dict, list):
            out += field_paths(sub, path)
    return out


# ---- the oracle --------------------------------------------------------------------------------------

# a field as errors write it: `train.lr`, `data.train.0`, `env.'a b'` (a key that is no plain name, quoted)
_PART = r"""(?:[A-Za-z0-9_][-A-Za-z0-9_]*|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
FIELD = rf"(?:\(spec\)|{_PART}(?:\.{_PART})*)"
CLICK_ERROR = re.compile(r"^Error: (.*)$", re.M)
# what a clean error may name instead of a file: an option of the command line
OPTIONS = re.compile(r"(--set|-n/--namespace|--namespace|--profile|--cluster|--slurm|--k8s|--local|--context|"
                     r"--output|'-o'|--policy|--since|'SPEC'|'POLICY'|'SPECS\.\.\.')")


def _field_words(models: list[type[BaseModel]]) -> re.Pattern[str]:
    words = {".".join(p) for m in models for p in field_paths(m)}
    alternation = "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
    return re.compile(rf"(?<![\w.])({alternation})(?![\w])")


_FIELDS: re.Pattern[str] | None = None


def fields_pattern() -> re.Pattern[str]:
    global _FIELDS
    if _FIELDS is None:
        from launcher.profile import Profile
        from launcher.quota import QuotaPolicy
        from launcher.spec import JobSpec

        _FIELDS = _field_words([JobSpec, Profile, QuotaPolicy])
    return _FIELDS


def check_cli(result: Any, sources: list[str], what: str, lined: set[str] = frozenset()) -> str:
    """A CliRunner result: exit 0, or exit 2 whose every error names where (a file of `sources`, with its line
    for a file in `lined`, or an option) and what (a field, or an option). Returns "ok" or "error"."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"{what}: a traceback instead of a clean error:\n{tb}")
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout, f"{what}:\n{err}"
    assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code}\n{result.stdout[-2000:]}\n{err[-2000:]}"
    if currently_in_test_context():  # a property's example (not a plain test using this oracle)
        OUTCOMES.setdefault(_CURRENT[0], Counter())["ok" if result.exit_code == 0 else "refused"] += 1
    if result.exit_code == 0:
        return "ok"
    click_error = CLICK_ERROR.search(err)
    if click_error:  # click's own usage errors name the option, argument or command, quoted
        assert re.search(r"'[^']*'|\"[^\"]*\"|No such option|unexpected extra", click_error.group(1)), \
            f"{what}: {err}"
        return "error"
    if (err + result.stdout).startswith("Usage:") and "Commands:" in err + result.stdout:
        return "error"  # `mbl` (or a group) alone: its help
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines, f"{what}: exit 2 without an error line:\n{err}"
    for i, line in enumerate(lines):
        check_error_line(line, err, sources, lined, what)
    return "error"


def check_error_line(line: str, err: str, sources: list[str], lined: set[str], what: str) -> None:
    rest = line[len("error: "):]
    for source in sorted(sources, key=len, reverse=True):
        if rest.startswith(source + ":"):
            after = rest[len(source):]
            m = re.match(rf"^(?::(?P<line>\d+))?: (?P<field>{FIELD}): (?P<msg>.+)$", after)
            assert m, f"{what}: no field in {line!r}"
            if source in lined:
                assert m.group("line") or re.search(r"cannot read|nests deeper|is required", m.group("msg")), \
                    f"{what}: no line number in {line!r}"
            return
    if rest.startswith("--set ") or rest.startswith("-n/--namespace"):
        return  # an option, then its field: `--set a.b=c: a.b: ...`
    assert not rest.startswith("<spec>"), f"{what}: an error that names no file: {line!r}"
    if any(repr(source) in rest for source in sources):
        return  # it names the argument it refuses (a job name that is not in the registry)
    # A rule of rendering (the cluster profile, the backend): it names the field or the option in words.
    assert fields_pattern().search(err) or OPTIONS.search(err), f"{what}: an error that names no field: {err!r}"


# ---- Kubernetes' rules for names, labels and annotations (apimachinery's, written out independently) ---------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
K8S_DNS_LABEL = re.compile(rf"^{_LABEL}$")
K8S_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
K8S_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
K8S_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
K8S_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def is_dns_label(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(K8S_DNS_LABEL.match(value))


def is_subdomain(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(K8S_SUBDOMAIN.match(value))


def is_label_key(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    prefix, slash, name = value.rpartition("/")
    if slash and not is_subdomain(prefix):
        return False
    return len(name) <= 63 and bool(K8S_QUALIFIED.match(name))


def is_label_value(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or (len(value) <= 63 and bool(K8S_QUALIFIED.match(value))))


def k8s_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every name, namespace, label, annotation, selector, env name and object reference that Kubernetes' API
    server would refuse, anywhere in `objects` (pod templates and runtime patches included)."""
    problems: list[str] = []

    def bad(where: str, what: str, value: Any) -> None:
        problems.append(f"{where}: {what} {value!r}")

    def labels(where: str, mapping: Any) -> None:
        if not isinstance(mapping, dict):
            return bad(where, "not a mapping", mapping)
        for key, val in mapping.items():
            if not is_label_key(key):
                bad(where, "label key", key)
            if not is_label_value(val):
                bad(where, f"label value of {key}", val)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        for key, val in node.items():
            here = f"{where}.{key}"
            if key == "metadata" and isinstance(val, dict):
                if "name" in val and not is_subdomain(val["name"]):
                    bad(here, "name", val["name"])
                if "namespace" in val and not is_dns_label(val["namespace"]):
                    bad(here, "namespace", val["namespace"])
                if "labels" in val:
                    labels(here + ".labels", val["labels"])
                for akey in (val.get("annotations") or {}):
                    if not is_label_key(akey):
                        bad(here, "annotation key", akey)
            elif key in ("nodeSelector", "matchLabels"):
                labels(here, val)
            elif key == "tolerations" and isinstance(val, list):
                for tol in val:
                    if tol.get("key") is not None and not is_label_key(tol["key"]):
                        bad(here, "toleration key", tol.get("key"))
                    if tol.get("value") is not None and not is_label_value(tol["value"]):
                        bad(here, "toleration value", tol.get("value"))
            elif key == "env" and isinstance(val, list):
                for entry in val:
                    if not K8S_ENV_NAME.match(str(entry.get("name", ""))):
                        bad(here, "env name", entry.get("name"))
                    ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and not (is_subdomain(ref.get("name")) and K8S_CONFIG_KEY.match(str(ref.get("key")))):
                        bad(here, "secretKeyRef", ref)
            elif key in ("serviceAccountName", "priorityClassName", "claimName", "clusterQueue"):
                if not is_subdomain(val):
                    bad(here, key, val)
            elif key == "imagePullSecrets" and isinstance(val, list):
                for ref in val:
                    if not is_subdomain(ref.get("name")):
                        bad(here, "image pull secret", ref.get("name"))
            elif key == "configMap" and isinstance(val, dict) and not is_subdomain(val.get("name")):
                bad(here, "configMap name", val.get("name"))
            walk(val, here)

    for obj in objects:
        if obj is None:
            continue
        name = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
        if obj.get("kind") in ("PyTorchJob", "TrainJob") and not is_dns_label(obj["metadata"]["name"]):
            bad(name, "job name (a DNS label: its pods and services are named after it)", obj["metadata"]["name"])
        walk(obj, name)
    return problems
