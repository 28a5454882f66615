"""A pipeline: named stages, each a job spec with overrides, run in dependency order, optionally over a sweep.

    kind: pipeline
    name: tiny-pipeline
    runs_dir: runs/{name}              # each job's run directory goes under it
    stages:
      pretrain:
        spec: pretrain-tiny.yaml       # a file relative to this one, or the job spec inline (a mapping)
        set: {train.max_steps: 100}    # `--set`-style overrides, dotted keys
      classify:
        spec: finetune-tiny.yaml
        after: [pretrain]              # a reference below implies it too
        set: {model.init_from: "${stages.pretrain.model}"}
        sweep:
          grid: {train.lr: [1.0e-3, 2.0e-3], train.seed: [0, 1]}    # or points: [{train.lr: 1.0e-3}, ...]
          max_parallel: 2

The file says `kind: pipeline`, the key every job spec starts with: `mbl validate`, `render` and `submit` tell
the two apart by it, as a person reading the file does, and an editor's schema can switch on it.

Loading (`load_pipeline`) validates everything before anything runs: the pipeline's own fields (Pydantic,
with the job spec's errors: file, line, field), the stage graph (unknown stages, cycles), the sweep keys
(fields of the job spec), the references (`${stages.NAME.run_dir}` and `${stages.NAME.model}`, its final
model folder), and the full job spec of every sweep point through the job spec's own validation, so that a
point that breaks batch arithmetic is named with its stage and index. The result is a plan: per stage, its
points in index order, each an ordinary resolved JobSpec with its own name and run directory
(`<runs_dir>/<stage>` or `<runs_dir>/<stage>-<label>`, launcher/sweep.py), stable across loads.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from launcher import sweep as S
from launcher.errors import SpecError, SpecProblem
from launcher.loading import Origins, apply_sets, explain, load_data, set_value, unknown_key, validate_data
from launcher.spec import DNS_1035, JobSpec, Strict

STAGE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
STAGE_NAME_MAX = 24
REF = re.compile(r"\$\{stages\.([^}]*)\}")
REF_ATTRS = {"run_dir": "its run directory", "model": "its final model folder (<run_dir>/final)"}
# The pipeline names every job and its run directory: these keys are not for `set:` or a sweep.
OWNED_KEYS = ("name", "checkpoint.dir")
SEED_KEY = "train.seed"


class SweepSpec(Strict):
    """The sweep of a stage: one job per point, each with its own run directory named from its overrides."""

    grid: dict[str, list[Any]] | None = Field(
        None, description="Dotted spec keys -> lists of values; the points are every combination (the first key "
        "varies slowest).")
    points: list[dict[str, Any]] | None = Field(
        None, description="An explicit list of points, each a mapping of dotted spec keys -> values.")
    max_parallel: int | None = Field(
        None, ge=1, le=10000, description="Points running at once. Unset: all at once on a cluster, one at a time "
        "on the local backend.")

    @model_validator(mode="after")
    def _one_kind(self) -> "SweepSpec":
        if (self.grid is None) == (self.points is None):
            raise ValueError("a sweep has either `grid` (keys -> lists of values) or `points` (a list of mappings)")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("sweep.grid is empty; give at least one key with a list of values")
            for key, values in self.grid.items():
                if not values:
                    raise ValueError(f"sweep.grid.{key} is an empty list; give at least one value")
                if len({repr(v) for v in values}) != len(values):
                    raise ValueError(f"sweep.grid.{key} repeats a value; each point runs once")
        if self.points is not None:
            if not self.points:
                raise ValueError("sweep.points is empty; give at least one mapping of keys -> values")
            seen = [repr(sorted(p.items())) for p in self.points]
            if len(set(seen)) != len(seen):
                raise ValueError("sweep.points repeats a point; each point runs once")
        return self

    def enumerate(self) -> list[dict[str, Any]]:
        """The points, in index order."""
        return S.grid_points(self.grid) if self.grid is not None else [dict(p) for p in self.points or []]


class StageSpec(Strict):
    """A stage: a job spec, overrides, what it runs after, and an optional sweep."""

    spec: str | dict[str, Any] = Field(
        description="The job spec: a file path relative to the pipeline file, or the spec itself (a mapping).")
    set: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the spec, `--set` style: dotted keys -> values. Strings may "
        "refer to another stage: ${stages.NAME.run_dir} (its run directory), ${stages.NAME.model} (its final model "
        "folder).")
    after: list[str] = Field(default_factory=list, description="Stages that must finish first (a reference implies "
                             "it too).")
    sweep: SweepSpec | None = Field(None, description="Run the stage once per point of a grid or list of overrides.")

    @field_validator("spec")
    @classmethod
    def _spec_path(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, str) and not value.strip():
            raise ValueError("give the job spec's file path (relative to the pipeline file) or the spec inline")
        if isinstance(value, dict) and "extends" in value:
            raise ValueError("an inline spec cannot use `extends`; write the file's path as `spec:` and the changes "
                             "in `set:`")
        return value


class PipelineSpec(Strict):
    """A pipeline: named stages (job specs with overrides), their order, sweeps of overrides."""

    kind: Literal["pipeline"] = Field(description="pipeline.")
    name: str = Field(description="Pipeline name: a DNS-1035 label of at most 30 characters; starts every job name.")
    runs_dir: str = Field(
        "runs/{name}", description="Where the run directories of the stages go (`{name}`: the pipeline's name): "
        "<runs_dir>/<stage> for a stage without a sweep, <runs_dir>/<stage>-<point label> for each sweep point. "
        "Relative paths resolve against the directory `mbl` runs in.")
    stages: dict[str, StageSpec] = Field(description="Stages by name (lower-case letters, digits and '-').")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not DNS_1035.match(value) or len(value) > 30:
            raise ValueError("must be a DNS-1035 label of at most 30 characters: lower-case letters, digits and "
                             "'-', starting with a letter (for example glue-sweep)")
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, StageSpec]) -> dict[str, StageSpec]:
        if not value:
            raise ValueError("a pipeline needs at least one stage")
        for name in value:
            if not STAGE_NAME.fullmatch(name) or len(name) > STAGE_NAME_MAX:
                raise ValueError(f"stage name {name!r} must be lower-case letters, digits and '-', starting with a "
                                 f"letter, at most {STAGE_NAME_MAX} characters (it is part of job names)")
        return value


# ---- the plan ---------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One job of a stage: sweep point `index` (0 without a sweep), its overrides, label and resolved spec."""

    stage: str
    index: int
    overrides: dict[str, Any]
    label: str
    spec: JobSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> str:
        return self.spec.run_dir


@dataclass
class Stage:
    name: str
    after: list[str]
    points: list[Point]
    max_parallel: int | None
    swept: bool

    @property
    def kind(self) -> str:
        return self.points[0].spec.kind

    def parallel(self, local: bool) -> int:
        """Points at once: max_parallel, else all of them (one at a time on the local backend)."""
        return self.max_parallel or (1 if local else len(self.points))


@dataclass
class Pipeline:
    path: str
    spec: PipelineSpec
    stages: list[Stage] = field(default_factory=list)  # in dependency order

    @property
    def name(self) -> str:
        return self.spec.name

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def points(self) -> list[Point]:
        return [p for s in self.stages for p in s.points]


def is_pipeline(data: Any) -> bool:
    """A parsed YAML document (launcher.loading.peek) is a pipeline spec."""
    return isinstance(data, dict) and data.get("kind") == "pipeline"


def load_pipeline(path: str | Path, sets: list[str] | None = None) -> Pipeline:
    """The validated plan of the pipeline at `path`; SpecError with every problem found, before anything runs.
    `sets` (`--set` of the command line) apply to the job spec of every stage, last."""
    data, origins = load_data(path, [], "pipeline")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(explain(exc, data, origins, PipelineSpec)) from None
    source = str(path)
    problems: list[SpecProblem] = []

    def where(*keys: str | int) -> tuple[str, int | None]:
        return origins.lookup(("stages", *keys))

    def problem(keys: tuple[str | int, ...], given: Any, message: str) -> None:
        problems.append(SpecProblem(*where(*keys), ("stages", *keys), given, message))

    # the graph: `after` and references, checked before any spec is built
    deps: dict[str, list[str]] = {}
    for name, stage in spec.stages.items():
        deps[name] = []
        for i, other in enumerate(stage.after):
            if other not in spec.stages:
                problem((name, "after", i), other, f"unknown stage {other!r}; stages: {', '.join(spec.stages)}")
            elif other == name:
                problem((name, "after", i), other, "a stage cannot run after itself")
            elif other not in deps[name]:
                deps[name].append(other)
        for keys, text in _strings(stage.model_dump(mode="json", include={"spec", "set", "sweep"}), (name,)):
            for ref in REF.findall(text):
                other, _, attr = ref.partition(".")
                if other not in spec.stages:
                    problem(keys, text, f"${{stages.{ref}}} refers to an unknown stage {other!r}; stages: "
                                        f"{', '.join(spec.stages)}")
                elif attr not in REF_ATTRS:
                    problem(keys, text, f"${{stages.{ref}}}: a stage offers " + ", ".join(
                        f"${{stages.{other}.{a}}} ({what})" for a, what in REF_ATTRS.items()))
                elif other == name:
                    problem(keys, text, "a stage cannot refer to its own outputs")
                elif other not in deps[name]:
                    deps[name].append(other)
    if problems:
        raise SpecError(problems)
    order = _order(deps, lambda name: SpecProblem(*where(name), ("stages", name), None, ""))

    runs_dir = spec.runs_dir.replace("{name}", spec.name)
    pipeline = Pipeline(source, spec)
    run_dirs: dict[str, list[str]] = {}
    for name in order:
        stage = spec.stages[name]
        built = _stage(pipeline, name, stage, deps[name], Path(source).parent, origins, runs_dir, run_dirs,
                       list(sets or []), problems)
        if built is not None:
            pipeline.stages.append(built)
            run_dirs[name] = [p.run_dir for p in built.points]
    if problems:
        raise SpecError(problems)
    return pipeline


def _strings(value: Any, keys: tuple[str | int, ...]):
    """(path, text) of every string in `value`, mapping keys included."""
    if isinstance(value, str):
        yield keys, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "${" in k:
                yield keys + (k,), k
            yield from _strings(v, keys + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, keys + (i,))


def _order(deps: dict[str, list[str]], at: Any) -> list[str]:
    """The stages in dependency order (ties in the order written); SpecError naming a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: placed

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            p = at(cycle[0])
            raise SpecError([SpecProblem(p.source, p.line, ("stages", cycle[0], "after"), None,
                                         "the stages wait for each other in a cycle: " + " -> ".join(cycle)
                                         + "; remove one of these `after` entries or references")])
        state[name] = 1
        for other in deps[name]:
            visit(other, path + [name])
        state[name] = 2
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def _stage(pipeline: Pipeline, name: str, stage: StageSpec, after: list[str], base: Path, origins: Origins,
           runs_dir: str, run_dirs: dict[str, list[str]], sets: list[str], problems: list[SpecProblem]) -> Stage | None:
    """The points of one stage, each a validated, resolved JobSpec; problems appended (None when any)."""
    found = len(problems)
    # the stage's job spec and where each of its values came from
    if isinstance(stage.spec, str):
        spec_path = base / stage.spec
        try:
            data, spec_origins = load_data(spec_path, [], "spec")
        except SpecError as exc:  # a file that cannot be read is named at the `spec:` line that names it
            src, line = origins.lookup(("stages", name, "spec"))
            problems += [SpecProblem(src, line, ("stages", name, "spec"), stage.spec, f"{spec_path}: {p.message}")
                         if p.message.startswith("cannot read") else p for p in exc.problems]
            return None
    else:
        data = copy.deepcopy(stage.spec)
        prefix = ("stages", name, "spec")
        spec_origins = Origins({k[len(prefix):]: v for k, v in origins.where.items() if k[:len(prefix)] == prefix})

    def at(*keys: str | int) -> tuple[str, int | None]:
        return origins.lookup(("stages", name, *keys))

    # the keys of `set:` and of the sweep: fields of the job spec, and not those the pipeline owns
    keyed: list[tuple[tuple[str | int, ...], str]] = [(("set", k), k) for k in stage.set]
    points = stage.sweep.enumerate() if stage.sweep else [{}]
    if stage.sweep and stage.sweep.grid is not None:
        keyed += [(("sweep", "grid", k), k) for k in stage.sweep.grid]
    elif stage.sweep:
        keyed += [(("sweep", "points", i, k), k) for i, p in enumerate(points) for k in p]
    for keys, key in keyed:
        parts = tuple(key.split("."))
        why = None
        if not all(parts):
            why = "a key is a dotted path of spec fields, like train.lr"
        elif key in OWNED_KEYS:
            why = (f"the pipeline names each job and its run directory ({runs_dir}/{name}[-<point>]); set runs_dir "
                   "at the top of the pipeline instead")
        else:
            why = unknown_key(parts)
        if why:
            problems.append(SpecProblem(*at(*keys), ("stages", name, *keys), None, why))
    if len(problems) > found:
        return None

    labels = S.labels(points) if stage.sweep else [""]
    built: list[Point] = []
    failures: dict[str, tuple[SpecProblem, list[int]]] = {}  # one problem, the points that have it
    for index, (overrides, label) in enumerate(zip(points, labels)):
        job = copy.deepcopy(data)
        job_origins = Origins(dict(spec_origins.where))
        for key, value in stage.set.items():
            set_value(job, tuple(key.split(".")), value, at("set", key), job_origins)
        for key, value in overrides.items():
            keys = ("sweep", "grid", key) if stage.sweep and stage.sweep.grid is not None else \
                ("sweep", "points", index, key)
            set_value(job, tuple(key.split(".")), value, at(*keys), job_origins)
        job = apply_sets(job, sets, job_origins)
        job["name"] = S.job_name(pipeline.name, name, label)
        job.setdefault("checkpoint", {})
        if isinstance(job["checkpoint"], dict):
            job["checkpoint"]["dir"] = f"{runs_dir}/{name}" + (f"-{label}" if label else "")
        job = _substitute(job, run_dirs, job_origins, failures, index)
        try:
            spec = validate_data(job, job_origins)
        except SpecError as exc:
            for p in exc.problems:
                _failed(failures, p, index)
            continue
        built.append(Point(name, index, overrides, label, spec.resolved()))
    for p, indices in failures.values():
        if not stage.sweep:
            which = f"stage {name}"
        elif len(indices) == len(points):
            which = f"stage {name}, every sweep point"
        else:
            which = f"stage {name}, sweep point " + ", ".join(f"{i} ({labels[i]})" for i in indices)
        problems.append(SpecProblem(p.source, p.line, p.path, p.given, f"{p.message} [{which}]"))
    if failures:
        return None
    parallel = stage.sweep.max_parallel if stage.sweep else None
    return Stage(name, after, built, parallel, stage.sweep is not None)


def _failed(failures: dict[str, tuple[SpecProblem, list[int]]], problem: SpecProblem, index: int) -> None:
    key = repr((problem.source, problem.line, problem.path, problem.given, problem.message))
    failures.setdefault(key, (problem, []))[1].append(index)


def _substitute(job: Any, run_dirs: dict[str, list[str]], origins: Origins,
                failures: dict[str, tuple[SpecProblem, list[int]]], index: int, keys: tuple = ()) -> Any:
    """`job` with every ${stages.NAME.run_dir|model} replaced (the graph check made sure NAME runs before)."""
    if isinstance(job, dict):
        return {k: _substitute(v, run_dirs, origins, failures, index, keys + (k,)) for k, v in job.items()}
    if isinstance(job, list):
        return [_substitute(v, run_dirs, origins, failures, index, keys + (i,)) for i, v in enumerate(job)]
    if not isinstance(job, str) or "${stages." not in job:
        return job

    def replace(match: re.Match[str]) -> str:
        other, _, attr = match.group(1).partition(".")
        if other not in run_dirs:  # that stage has problems of its own, reported already
            return match.group(0)
        dirs = run_dirs[other]
        if len(dirs) != 1:
            source, line = origins.lookup(keys)
            _failed(failures, SpecProblem(source, line, keys, job, f"${{stages.{other}.{attr}}}: stage {other} is a "
                                          f"sweep of {len(dirs)} points, so it has no one {attr}; refer to a stage "
                                          "without a sweep"), index)
            return match.group(0)
        return dirs[0] + ("/final" if attr == "model" else "")

    return REF.sub(replace, job)


def describe(pipeline: Pipeline, local: bool = True, kueue: bool = False) -> list[str]:
    """The plan for people: each stage, what it waits for, its points with their run directories. On Kubernetes
    (`kueue`) every point is its own job from the start, admitted as the team's quota allows."""
    lines = [f"pipeline {pipeline.name!r} ({pipeline.path}): {len(pipeline.stages)} stage(s), "
             f"{len(pipeline.points)} job(s)"]
    for stage in pipeline.stages:
        head = f"  {stage.name}: {stage.kind}"
        if stage.after:
            head += f", after {', '.join(stage.after)}"
        if stage.swept:
            head += f", sweep of {len(stage.points)} point(s), " + (
                "as many at a time as Kueue admits" if kueue else f"{stage.parallel(local)} at a time")
        lines.append(head)
        for p in stage.points:
            what = ", ".join(f"{k}={S.value_text(v)}" for k, v in p.overrides.items())
            lines.append(f"    {p.index:>3}  {p.name}  {p.run_dir}" + (f"  ({what})" if what else ""))
    return lines


def json_schema() -> dict[str, Any]:
    """The pipeline spec's JSON Schema (Draft 2020-12); an inline stage spec is a job spec (`mbl schema`)."""
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/mbl-project/mbl/schemas/pipeline.json"
    return schema

