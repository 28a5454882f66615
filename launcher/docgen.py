"""Generate docs/spec-reference.md from the Pydantic models (a test keeps the file in sync).

    python -m launcher.docgen > docs/spec-reference.md
"""

from __future__ import annotations

import enum
import inspect
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.pipeline import PipelineSpec
from launcher.spec import JobSpec, Strict


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(repr(m.value) for m in annotation)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _section(model: type[BaseModel], prefix: str, out: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    out.append("| field | type | default | description |")
    out.append("|---|---|---|---|")
    for name, info in model.model_fields.items():
        annotation = info.annotation
        sub = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, Strict)]
        if sub:
            suffix = {dict: ".<NAME>", list: "[]"}.get(typing.get_origin(annotation), "")  # type: ignore[call-overload]
            nested.append((f"{prefix}{name}{suffix}", sub[0]))
        if info.default is not PydanticUndefined:
            default = info.default
            default = default.value if isinstance(default, enum.Enum) else default
            shown = f"`{default!r}`" if not isinstance(default, BaseModel) else "(section)"
        elif info.default_factory is not None:
            value = info.default_factory()  # type: ignore[call-arg]
            shown = "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
        else:
            shown = "**required**"
        kind = "section" if sub and not typing.get_origin(annotation) in (list, dict) else _type_name(annotation)
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{prefix}{name}` | {kind} | {shown} | {desc} |")
    out.append("")


def render() -> str:
    out = [
        "# Job spec reference",
        "",
        "Generated from `launcher/spec.py` by `python -m launcher.docgen`; `tests/test_docs.py` keeps it in sync.",
        "Unknown keys are errors. `extends: other.yaml` merges another spec under this one;",
        "`--set a.b=value` overrides a field; `${env:NAME}` and `${env:NAME:-default}` read the environment.",
        "",
        "## Top level",
        "",
    ]
    _sections(JobSpec, out)
    out += [
        "# Pipeline spec reference",
        "",
        "A file with `kind: pipeline` (launcher/pipeline.py): stages of job specs with `--set`-style overrides, their",
        "order, and sweeps. Strings in `set` and in a sweep may refer to an earlier stage: `${stages.NAME.run_dir}`",
        "(its run directory) and `${stages.NAME.model}` (its final model folder). `mbl schema --pipeline` prints",
        "its JSON Schema.",
        "",
        "## Top level",
        "",
    ]
    _sections(PipelineSpec, out)
    return "\n".join(out)


def _sections(root: type[BaseModel], out: list[str]) -> None:
    """The fields of `root`, then a section per nested model, breadth first."""
    queue: list[tuple[str, type[BaseModel]]] = []
    _section(root, "", out, queue)
    seen = set()
    while queue:
        path, model = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        out += [f"## `{path}`", ""]
        if model.__doc__ and model.__doc__ != Strict.__doc__:
            out += [inspect.cleandoc(model.__doc__), ""]
        _section(model, f"{path}.", out, queue)


if __name__ == "__main__":
    print(render(), end="")
