"""YAML -> JobSpec: `extends:`, `--set a.b=value`, `${env:NAME}`, and errors that say where and how to fix.

Every value remembers where it came from (file and line, or the `--set` that gave it), so that a
validation error can point at the line to edit. The one loader of every YAML document mbl reads: job specs
(`load_spec`), and through `load_document` the cluster profile and the quota policy, with the same line
numbers and "did you mean" suggestions.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import SpecError, SpecProblem
from launcher.spec import JobSpec

Path_ = tuple[str | int, ...]
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_EXTENDS_DEPTH = 8
# A spec nests four levels; a document nesting far deeper, or whose aliases repeat more values than this (a
# recursive alias, "billion laughs"), is refused before anything else walks it.
MAX_DEPTH = 32
MAX_REPEATED = 10_000
# Setup lines are shell code, run as written: what `${env:NAME}` brings into one must not be shell syntax.
SHELL_WORDS = re.compile(r"[-A-Za-z0-9_@%+=:,./ ]*")
SHELL_FIELDS = ("slurm", "setup")  # slurm.setup of a spec and of a cluster profile


@dataclass
class Origins:
    """Where each value of a merged document came from: path -> (file, line)."""

    where: dict[Path_, tuple[str, int | None]] = field(default_factory=dict)

    def lookup(self, path: Path_) -> tuple[str, int | None]:
        # The nearest recorded ancestor: an error about `train` points at the `train:` line.
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.where:
                return self.where[path[:cut]]
        return ("<spec>", None)


_OPENS = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
          yaml.BlockMappingStartToken)
_CLOSES = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _too_deep(text: str) -> int | None:
    """The line where the document nests deeper than MAX_DEPTH collections, else None. Read token by token
    before composing: PyYAML composes recursively and scans deep flow nesting in quadratic time, so that a few
    kilobytes of brackets would take seconds and end in a RecursionError."""
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, _OPENS):
                depth += 1
                if depth > MAX_DEPTH + 1:  # the document's own mapping is one level
                    return token.start_mark.line + 1
            elif isinstance(token, _CLOSES):
                depth -= 1
    except yaml.YAMLError:
        return None  # composing says what is wrong, and where
    return None


def _compose(text: str, source: str) -> tuple[Any, dict[Path_, tuple[str, int | None]]]:
    """Safe-load YAML and record the line of every key. Refuses recursive aliases, nesting deeper than
    MAX_DEPTH and documents whose aliases repeat more than MAX_REPEATED values."""
    deep = _too_deep(text)
    if deep:
        raise SpecError([SpecProblem(source, deep, (), None, f"nests deeper than {MAX_DEPTH} levels")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError([SpecProblem(source, line, (), None, f"not valid YAML: {getattr(exc, 'problem', exc)}")])
    except RecursionError:
        raise SpecError([SpecProblem(source, None, (), None, f"nests deeper than {MAX_DEPTH} levels")]) from None
    lines: dict[Path_, tuple[str, int | None]] = {}
    seen: set[int] = set()
    repeated = 0

    def refuse(n: yaml.Node, path: Path_, why: str) -> None:
        raise SpecError([SpecProblem(source, n.start_mark.line + 1, path, None, why)])

    def walk(n: yaml.Node, path: Path_, open_: tuple[int, ...]) -> None:
        nonlocal repeated
        if id(n) in seen:  # reached again through an alias (*name)
            repeated += 1
            if repeated > MAX_REPEATED:
                refuse(n, path, f"its aliases (*name) repeat more than {MAX_REPEATED} values (aliases of aliases?)")
        seen.add(id(n))
        if len(path) > MAX_DEPTH:
            refuse(n, path[:MAX_DEPTH], f"nests deeper than {MAX_DEPTH} levels")
        if id(n) in open_:
            refuse(n, path, "an alias (*name) refers to a value that contains it: the value would never end")
        lines[path] = (source, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                child = path + (key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.tag),)
                walk(value_node, child, open_ + (id(n),))
                lines[child] = (source, key_node.start_mark.line + 1)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (i,), open_ + (id(n),))

    if node is not None:
        walk(node, (), ())
    return data, lines


def _interpolate(value: Any, path: Path_, origins: Origins, problems: list[SpecProblem]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), origins, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), origins, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name, default)
        source, line = origins.lookup(path)
        if found is None:
            problems.append(
                SpecProblem(source, line, path, value, f"environment variable {name} is not set; export it or write "
                            f"${{env:{name}:-default}}")
            )
            return ""
        if path[:2] == SHELL_FIELDS and not SHELL_WORDS.fullmatch(found):
            bad = next(c for c in found if not SHELL_WORDS.fullmatch(c))
            problems.append(
                SpecProblem(source, line, path, value, f"${{env:{name}}} would put shell syntax ({bad!r}) into a "
                            "setup line, which runs as written; write the command in the line itself, or use "
                            f"\"${name}\" (the job's environment) instead of ${{env:{name}}}")
            )
        return found

    return ENV_REF.sub(substitute, value)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; mappings merge key by key, everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unreadable(source: str, what: str, why: str) -> SpecError:
    return SpecError([SpecProblem(source, None, (), None, f"cannot read the {what}: {why}")])


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # Python 3.11 raises RuntimeError on a symlink loop
        raise _unreadable(str(path), what, getattr(exc, "strerror", None) or str(exc)) from None


def _read(path: Path, origins: Origins, depth: int = 0, what: str = "spec",
          chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One file and, through `extends`, the files it builds on (`chain`: those that extend this one)."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(source, what, exc.strerror or str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError([SpecProblem(source, line, (), None, f"is not UTF-8 text (byte {raw[exc.start]:#04x})")]) \
            from None
    data, lines = _compose(text, source)
    lines.setdefault((), (source, None))  # an empty document: its problems still name the file
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([SpecProblem(source, 1, (), type(data).__name__, f"a {what} is a YAML mapping (key: value)")])
    parent = data.pop("extends", None)
    if parent is None:
        origins.where.update(lines)
        return data
    if not isinstance(parent, str):
        raise SpecError([SpecProblem(source, lines.get(("extends",), (source, None))[1], ("extends",), parent,
                                     "`extends` takes one file path, relative to this file")])
    if "\0" in parent:
        raise SpecError([SpecProblem(source, lines.get(("extends",), (source, None))[1], ("extends",), parent,
                                     "`extends` takes a file path, and this one contains a NUL character")])
    parent_path = _resolve(path.parent / parent, what)
    line = lines.get(("extends",), (source, None))[1]
    if parent_path in (*chain, path):
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(parent_path):], path, parent_path)) \
            if parent_path in chain else f"{path} -> {path}"
        raise SpecError([SpecProblem(source, line, ("extends",), parent, f"`extends` makes a cycle: {cycle}")])
    if depth >= MAX_EXTENDS_DEPTH:
        raise SpecError([SpecProblem(source, line, ("extends",), parent,
                                     f"`extends` chains more than {MAX_EXTENDS_DEPTH} files")])
    try:
        base = _read(parent_path, origins, depth + 1, what, (*chain, path))
    except SpecError as exc:  # a parent that cannot be read at all: say so at the `extends` line that names it
        unreadable = [p for p in exc.problems if p.source == str(parent_path) and p.message.startswith("cannot read")]
        if not unreadable:
            raise
        why = unreadable[0].message.split(": ", 1)[-1]
        raise SpecError([SpecProblem(source, line, ("extends",), parent, f"cannot read {parent_path}: {why}")]) \
            from None
    origins.where.update(lines)  # the child's lines win where it sets a value
    return deep_merge(base, data)


def _parse_set(expr: str) -> tuple[Path_, Any]:
    if "=" not in expr:
        raise SpecError([SpecProblem("--set", None, (), expr, "expected KEY.PATH=VALUE, for example train.lr=3e-4")])
    key, raw = expr.split("=", 1)
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise SpecError([SpecProblem("--set", None, (), expr, "expected KEY.PATH=VALUE, for example train.lr=3e-4")])
    # Values stay strings and Pydantic converts them to the field's type ("3" -> 3 for an int field, but
    # "123" stays "123" for a string field). Flow collections and null are parsed as YAML.
    value: Any = raw
    stripped = raw.strip()
    if stripped[:1] in ("[", "{") or stripped in ("null", "~"):
        try:
            value, _lines = _compose(stripped, f"--set {expr}")
        except SpecError as exc:
            raise SpecError([replace(p, line=None, path=parts + p.path, given=raw) for p in exc.problems]) from None
    return parts, value


def apply_sets(data: dict[str, Any], sets: list[str], origins: Origins) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for expr in sets:
        parts, value = _parse_set(expr)
        set_value(data, parts, value, (f"--set {expr}", None), origins)
    return data


def set_value(data: dict[str, Any], parts: Path_, value: Any, where: tuple[str, int | None],
              origins: Origins) -> None:
    """`data[parts[0]][parts[1]]... = value` in place, making the sections on the way, and remember `where` (the
    `--set` or the file and line that gave it) as the origin of the value: `--set` and a pipeline's `set:`."""
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is not None and not isinstance(node[part], dict):
            field = ".".join(str(p) for p in parts[:i + 1])
            raise SpecError([SpecProblem(where[0], where[1], parts[:i + 1], node[part],
                                         f"{field} is a value, not a section: it has no key "
                                         f"{parts[i + 1]!r}; set {field}=VALUE instead")])
        if node.get(part) is None:
            node[part] = {}
            origins.where[parts[:i + 1]] = where
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)
    origins.where[parts] = where


def load_data(path: str | Path, sets: list[str] | None = None, what: str = "spec") -> tuple[dict[str, Any], Origins]:
    """The merged, interpolated document and where each value came from."""
    origins = Origins()
    if "\0" in str(path):
        raise _unreadable(repr(str(path)), what, "the path contains a NUL character")
    # Keep file names as the user typed them in messages.
    shown = str(path)
    resolved = str(_resolve(Path(path), what))
    try:
        data = _read(Path(resolved) if not Path(path).is_absolute() else Path(path), origins, what=what)
    except SpecError as exc:
        raise SpecError([replace(p, source=shown if p.source == resolved else p.source) for p in exc.problems]) \
            from None
    origins.where = {k: ((shown if f == resolved else f), ln) for k, (f, ln) in origins.where.items()}
    data = apply_sets(data, sets or [], origins)
    problems: list[SpecProblem] = []
    data = _interpolate(data, (), origins, problems)
    if problems:
        raise SpecError(problems)
    return data, origins


def peek(path: str | Path) -> Any:
    """The YAML document at `path` as parsed data, with the loader's guards (depth, aliases); None when it cannot
    be read or parsed (loading it reports why). For telling a quota policy from a job spec."""
    try:
        return _compose(Path(path).read_text(), str(path))[0]
    except (OSError, ValueError, SpecError):  # ValueError: not UTF-8, a NUL in the path
        return None


def load_spec(path: str | Path, sets: list[str] | None = None) -> JobSpec:
    data, origins = load_data(path, sets)
    return validate_data(data, origins)


M = TypeVar("M", bound=BaseModel)


def load_document(path: str | Path, model: type[M], what: str) -> M:
    """Another YAML document (`what`: "cluster profile", "quota policy") as `model`, with the spec's errors:
    file and line, field, the value given, "did you mean" for unknown keys."""
    data, origins = load_data(path, [], what)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(explain(exc, data, origins, model)) from None


def validate_data(data: dict[str, Any], origins: Origins) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = explain(exc, data, origins)
        problems += _cross_field_despite(exc, data, origins, problems)
        raise SpecError(problems) from None


def _cross_field_despite(
    exc: ValidationError, data: dict[str, Any], origins: Origins, found: list[SpecProblem]
) -> list[SpecProblem]:
    """Cross-field rules run only once every field is valid; run them anyway, with the broken fields removed,
    so that one pass reports every problem. Messages that involve a removed field are dropped."""
    removed = [tuple(e["loc"]) for e in exc.errors() if e["loc"]]
    if not removed or any(len(loc) == 0 for loc in removed):
        return []
    trimmed = copy.deepcopy(data)
    for loc in removed:
        node = trimmed
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    try:
        JobSpec.model_validate(trimmed)
        return []
    except ValidationError as again:
        names = {".".join(str(p) for p in loc) for loc in removed}
        seen = {p.message for p in found}
        extra = []
        for problem in explain(again, trimmed, origins):
            if problem.message in seen or any(n in problem.message for n in names):
                continue
            if ".".join(str(p) for p in problem.path) in names:
                continue
            extra.append(problem)
        return extra


# ---- turning Pydantic's errors into actionable ones ----------------------------------------------


def _model_at(path: Path_, root: type[BaseModel] = JobSpec) -> type[BaseModel] | None:
    """The Pydantic model whose fields live at `path` (for "did you mean" suggestions). A key of a mapping
    of models (`teams.nlp` of a quota policy) or an index of a list of them is stepped over."""
    model: Any = root
    keyed = False  # the previous field is a dict or list of models: this part is its key or index
    for part in path:
        if keyed:
            keyed = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        origin = getattr(info.annotation, "__origin__", None)
        keyed = origin in (dict, list)
        model = _unwrap(info.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def unknown_key(parts: Path_, root: type[BaseModel] = JobSpec) -> str | None:
    """Why the dotted key `parts` names no field of `root` (the message of an unknown key, with "did you
    mean"), or None. Keys below a mapping field (`env.NAME`, `slurm.sbatch_args.NAME`) are free."""
    for cut in range(1, len(parts) + 1):
        model = _model_at(parts[:cut - 1], root)
        if model is None:  # below a mapping or a plain value: Pydantic says whether it fits
            return None
        key = str(parts[cut - 1])
        if key not in model.model_fields:
            fields = sorted(model.model_fields)
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`? " if close else ""
            return f"unknown key `{key}`; {hint}allowed here: {', '.join(fields)}"
    return None


def _unwrap(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _allowed(ctx: dict[str, Any] | None) -> str:
    if not ctx:
        return ""
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"allowed: {word} {ctx[key]}"
    return ""


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def explain(exc: ValidationError, data: dict[str, Any], origins: Origins,
            root: type[BaseModel] = JobSpec) -> list[SpecProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc: Path_ = tuple(err["loc"])
        # Drop Pydantic's union-branch markers (e.g. 'int', 'str') from the path.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p in {"int", "float", "bool", "str"}))
        given = err.get("input")
        source, line = origins.lookup(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            model = _model_at(parent, root)
            fields = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`? " if close else ""
            msg = f"unknown key `{key}`; {hint}allowed here: {', '.join(fields)}"
            problems.append(SpecProblem(source, line, loc, None, msg))
            continue
        if kind == "missing":
            problems.append(SpecProblem(source, line, loc, None, "is required"))
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        allowed = _allowed(err.get("ctx"))
        if allowed and allowed not in msg:
            msg = f"{msg} ({allowed})"
        if loc == () or kind == "value_error" and isinstance(given, dict):
            # A cross-field rule: report each part against the first field it names.
            for part in msg.split("\n"):
                field_path = _first_field(part)
                src, ln = origins.lookup(field_path) if field_path else (source, line)
                problems.append(SpecProblem(src, ln, field_path or loc, None, part))
            continue
        problems.append(SpecProblem(source, line, loc, given if given is not None else _get(data, loc), msg))
    return problems


_FIELD_REF = re.compile(r"\b((?:model|data|task|train|distributed|resources|checkpoint|export|slurm|k8s|tracking|env)"
                        r"\.[A-Za-z_][A-Za-z0-9_]*)")


def _first_field(text: str) -> Path_:
    match = _FIELD_REF.search(text)
    return tuple(match.group(1).split(".")) if match else ()
