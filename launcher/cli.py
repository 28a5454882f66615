"""`mbl`: validate, render, submit and follow ModernBERT jobs. The one place errors become exit codes.

Exit codes: 0 success; 1 an operation failed (cluster error, job failed); 2 bad input (spec, flags).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from launcher.errors import MblError, SpecError, UsageError

from launcher.backends import BACKENDS as CLUSTERS


class MblGroup(click.Group):
    """Turns MblError into `error: ...` on stderr and its exit code; a traceback only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MblError as exc:
            if ctx.meta.get("mbl.debug"):
                raise
            click.echo(exc.render(), err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=MblGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="mbl")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Launch ModernBERT pre-training and fine-tuning on Slurm, Kubernetes or this machine.

    \b
    A five-minute tour:
      mbl validate examples/*.yaml
      mbl render examples/pretrain-tiny.yaml               # what `submit` would run here
      mbl submit examples/pretrain-tiny.yaml               # train on this machine (default: --cluster local)
      mbl submit examples/finetune-tiny.yaml
      mbl render --slurm examples/pretrain.yaml            # the sbatch script
      mbl render --k8s examples/finetune.yaml | kubectl apply -f -
      mbl list; mbl status JOB; mbl logs -f JOB; mbl cancel JOB
      mbl plot runs/tiny-pretrain runs/tiny-finetune      # loss, evaluations, tokens/s as a PNG
    """
    ctx.meta["mbl.debug"] = debug


# ---- shared options ------------------------------------------------------------------------------


def cluster_options(fn: Any) -> Any:
    options = [
        click.option("--cluster", "-c", type=click.Choice(CLUSTERS), default=None,
                     help="Where the job runs (default: local)."),
        click.option("--slurm", "short", flag_value="slurm", help="Short for --cluster slurm."),
        click.option("--k8s", "short", flag_value="k8s", help="Short for --cluster k8s."),
        click.option("--local", "short", flag_value="local", help="Short for --cluster local."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a spec field, e.g. --set train.lr=3e-4 (repeatable)."),
        click.option("--profile", type=click.Path(dir_okay=False), default=None,
                     help="Cluster profile YAML (default: $MBL_PROFILE or ~/.config/mbl/profile.yaml)."),
        click.option("--context", "kube_context", default=None, help="k8s: kubeconfig context."),
        click.option("--namespace", "-n", default=None, help="k8s: namespace (overrides k8s.namespace)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _cluster(cluster: str | None, short: str | None) -> str:
    if cluster and short and cluster != short:
        raise UsageError(f"--cluster {cluster} and --{short} disagree", hint="give one of them")
    return cluster or short or "local"


def _load(spec_path: str, sets: tuple[str, ...], namespace: str | None = None):
    from launcher.loading import load_spec

    spec = load_spec(spec_path, list(sets))
    if namespace:
        from pydantic import ValidationError

        try:  # validated like the spec's own k8s.namespace (model_copy would skip the validators)
            spec.k8s.namespace = namespace
        except ValidationError as exc:
            raise UsageError(f"-n/--namespace {namespace!r}: {exc.errors()[0]['msg']}",
                             hint="give a DNS label such as research-nlp, or set k8s.namespace in the spec") from None
    return spec.resolved()


def _backend(name: str, **opts: Any):
    from launcher.backends import get_backend

    accepted = {
        "local": {"detach", "force"},
        "slurm": {"profile", "force"},
        "k8s": {"profile", "kube_context", "server_dry_run"},
    }[name]
    return get_backend(name, **{k: v for k, v in opts.items() if k in accepted and v is not None})


def _registry():
    from launcher.registry import Registry

    return Registry()


# ---- commands ------------------------------------------------------------------------------------


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a spec field (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
def validate(specs: tuple[str, ...], sets: tuple[str, ...], quiet: bool) -> None:
    """Check spec files: types, ranges, unknown keys, batch arithmetic, names. A team quota policy (a file
    with `teams:` and no `kind:`) is checked as one.

    \b
    Example:
      mbl validate examples/*.yaml
      mbl validate pretrain.yaml --set train.global_batch_size=4096
    """
    failed: list[SpecError] = []
    for path in specs:
        try:
            line = _validated(path, sets)
        except SpecError as exc:
            failed.append(exc)
            click.echo(exc.render(), err=True)
            continue
        if not quiet:
            click.echo(f"ok: {path}: {line}")
    if failed:
        sys.exit(2)


def _validated(path: str, sets: tuple[str, ...]) -> str:
    """What `mbl validate` says of a valid file (a pipeline, a quota policy or a job spec); SpecError if not."""
    if _is_pipeline(path):
        from launcher.pipeline import load_pipeline

        pipeline = load_pipeline(path, list(sets))
        stages = ", ".join(f"{s.name} ({len(s.points)})" if s.swept else s.name for s in pipeline.stages)
        return f"pipeline {pipeline.name!r}, {len(pipeline.points)} job(s): {stages}"
    if _is_policy(path):
        from launcher.quota import load_policy

        policy = load_policy(path)
        return f"quota policy, teams {', '.join(f'{n} ({t.gpus} GPUs)' for n, t in policy.teams.items())}"
    from launcher.loading import load_spec

    spec = load_spec(path, list(sets))
    d, t = spec.distributed, spec.train
    return (f"{spec.kind} {spec.name!r}, {d.nodes} node(s) x {d.gpus_per_node} GPU(s), global batch "
            f"{t.global_batch_size} = {t.micro_batch_size} x {spec.grad_accum} accumulation x {d.world_size} ranks")


def _is_pipeline(path: str) -> bool:
    """A pipeline spec (`kind: pipeline`, launcher/pipeline.py) rather than a job spec."""
    from launcher.loading import peek
    from launcher.pipeline import is_pipeline

    return is_pipeline(peek(path))


def _is_policy(path: str) -> bool:
    """A quota policy rather than a job spec: a mapping with `teams` and without `kind`."""
    from launcher.loading import peek

    data = peek(path)  # None when it cannot be read: load_spec reports why
    return isinstance(data, dict) and "teams" in data and "kind" not in data


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@cluster_options
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write the rendered files into DIR instead of printing them.")
def render(spec_path: str, cluster: str | None, short: str | None, sets: tuple[str, ...], profile: str | None,
           kube_context: str | None, namespace: str | None, out_dir: str | None) -> None:
    """Print what `submit` would run: the command line, then the script or manifests.

    \b
    Examples:
      mbl render examples/pretrain-tiny.yaml
      mbl render --slurm examples/pretrain.yaml -o build/
      mbl render --k8s examples/finetune.yaml | kubectl apply --dry-run=client -f -
    """
    name = _cluster(cluster, short)
    if _is_pipeline(spec_path):
        pipeline = _pipeline_plan(spec_path, sets, name)
        if name == "k8s":
            from launcher.pipeline_k8s import render as render_k8s

            click.echo(render_k8s(pipeline, _backend("k8s", profile=profile, kube_context=kube_context)), nl=False)
        if name == "slurm":
            from launcher.pipeline_slurm import render as render_slurm

            click.echo(render_slurm(pipeline, _backend("slurm", profile=profile).profile.slurm), nl=False)
        return
    spec = _load(spec_path, sets, namespace)
    request = _backend(name, profile=profile, kube_context=kube_context).dryrun(spec)
    if out_dir:
        try:
            written = request.write(Path(out_dir))
        except OSError as exc:
            raise UsageError(f"-o/--output {out_dir}: cannot write the rendered files there: "
                             f"{exc.strerror or exc}", hint="give a directory that can be created") from None
        for path in written:
            click.echo(f"wrote {path}")
        return
    if name == "k8s":
        click.echo(request.files.get("manifests.yaml", str(request)), nl=False)
    else:
        click.echo(str(request), nl=False)


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@cluster_options
@click.option("--dry-run", is_flag=True, help="Render and check, submit nothing (k8s: server-side dry run).")
@click.option("--detach", "-d", is_flag=True, help="local: run in the background and return at once.")
@click.option("--force", is_flag=True, help="Start into a run directory that holds a different spec.")
@click.option("--no-quota-check", is_flag=True, help="Skip the team GPU quota pre-check.")
@click.option("--verbose", "-v", is_flag=True, help="local: print every log line (default: hide known-harmless "
              "library warnings and lines repeated by every rank).")
def submit(spec_path: str, cluster: str | None, short: str | None, sets: tuple[str, ...], profile: str | None,
           kube_context: str | None, namespace: str | None, dry_run: bool, detach: bool, force: bool,
           no_quota_check: bool, verbose: bool) -> None:
    """Validate, render and submit a job; the same request `render` prints.

    \b
    Examples:
      mbl submit examples/pretrain-tiny.yaml             # local, foreground, live progress
      mbl submit -d examples/pretrain-tiny.yaml          # local, in the background
      mbl submit --slurm examples/pretrain.yaml --set distributed.nodes=4
      mbl submit --k8s examples/finetune.yaml -n research
    """
    name = _cluster(cluster, short)
    if _is_pipeline(spec_path):
        sys.exit(_submit_pipeline(spec_path, sets, name, dry_run, detach, force, profile, no_quota_check,
                                  kube_context))
    if force and name == "k8s":  # never dropped silently
        raise UsageError("--force does not apply to --k8s: a job name is never replaced in the cluster",
                         hint="delete the old job first (mbl cancel NAME), then submit; the run resumes from its "
                              "checkpoints on the volume")
    spec = _load(spec_path, sets, namespace)
    backend = _backend(name, profile=profile, kube_context=kube_context, detach=detach, force=force,
                       server_dry_run=dry_run if name == "k8s" else None)
    request = backend.dryrun(spec)
    if dry_run and name != "k8s":
        click.echo(str(request), nl=False)
        return
    registry = _registry()
    if not dry_run:
        from launcher.rundir import refuse_live_writer

        refuse_live_writer(spec, registry, _backend)  # one writer per run directory
    if not no_quota_check and name != "local" and not dry_run:
        _quota_precheck(name, spec, backend)
    ref = backend.submit(request)
    if dry_run:
        click.echo(f"server-side dry run accepted {spec.name} in namespace {spec.k8s.namespace}")
        return
    record = registry.add(ref, team=spec.team, kind=spec.kind, gpus=spec.total_gpus if name != "local" else 0)
    click.echo(f"submitted {spec.kind} {spec.name!r} to {name}: job {ref.job_id}, run dir {ref.run_dir}", err=True)
    if name != "local" or detach:
        click.echo(f"  follow: mbl logs -f {spec.name}    status: mbl status {spec.name}", err=True)
        return
    sys.exit(_follow_local(backend, registry, record, verbose))


def _pipeline_plan(path: str, sets: tuple[str, ...], cluster: str) -> Any:
    """Load and validate a pipeline, print its plan (stages, points, run directories); the pipeline."""
    from launcher.pipeline import describe, load_pipeline

    pipeline = load_pipeline(path, list(sets))
    for line in describe(pipeline, local=cluster == "local", kueue=cluster == "k8s"):
        click.echo(("# " + line) if cluster == "k8s" else line)
    return pipeline


def _submit_pipeline(path: str, sets: tuple[str, ...], cluster: str, dry_run: bool, detach: bool,
                     force: bool, profile: str | None = None, no_quota_check: bool = False,
                     kube_context: str | None = None) -> int:
    """`mbl submit PIPELINE`: locally, every stage in dependency order in the foreground (launcher/pipeline_run.py);
    on Slurm, one job (or job array) per stage chained with afterok, and return (launcher/pipeline_slurm.py)."""
    if force or (detach and cluster == "local"):
        raise UsageError(f"{'--force' if force else '--detach'} does not apply to a pipeline",
                         hint="a pipeline runs in the foreground; Ctrl-C stops it and submitting it again resumes it"
                         if cluster == "local" else "submitting it again resumes unfinished points and skips "
                         "finished ones")
    pipeline = _pipeline_plan(path, sets, cluster)
    if cluster == "k8s":
        from launcher import pipeline_k8s

        backend = _backend("k8s", profile=profile, kube_context=kube_context)
        pipeline_k8s.plan(pipeline, backend)  # every point renders before anything is created
        if dry_run:
            click.echo(pipeline_k8s.render(pipeline, backend), nl=False)
            return 0
        return pipeline_k8s.submit(pipeline, backend, _registry(), lambda line: click.echo(line, err=True))
    if cluster == "slurm":
        from launcher import pipeline_slurm

        backend = _backend("slurm", profile=profile)
        jobs, _skipped = pipeline_slurm.plan(pipeline, backend.profile.slurm)
        registry = _registry()
        pipeline_slurm.check(pipeline, jobs, registry, _backend)
        if dry_run:
            click.echo(pipeline_slurm.render(pipeline, backend.profile.slurm), nl=False)
            return 0
        if not no_quota_check:  # each stage as it will run: a sweep counts as its max_parallel jobs
            for job in jobs:
                _quota_precheck("slurm", job.points[0].spec, backend,
                                count=min(len(job.points), job.stage.parallel(local=False)))
        return pipeline_slurm.submit(pipeline, backend, registry, lambda line: click.echo(line, err=True))
    from launcher.pipeline_run import check_points, run_local

    registry = _registry()
    check_points(pipeline, registry, _backend)
    if dry_run:
        return 0
    backend = _backend("local")
    return run_local(pipeline, registry, backend, lambda line: click.echo(line, err=True))


def _policy_path(explicit: str | None) -> Path | None:
    """--policy, else $MBL_QUOTA_POLICY, else ~/.config/mbl/quota.yaml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("MBL_QUOTA_POLICY"):
        return Path(os.environ["MBL_QUOTA_POLICY"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mbl" / "quota.yaml"
    return config if config.exists() else None


def _quota_precheck(cluster: str, spec: Any, backend: Any, count: int = 1) -> None:
    """Refuse a job that would break its team's GPU share, when a quota policy is configured. The use counted
    is that of the account and partition the job is submitted to (the profile's defaults, as the renderer
    uses them) on Slurm, and the team's current use on Kubernetes."""
    policy = _policy_path(None)
    if policy is None:
        return
    from launcher import quota

    usage, part = None, None
    if cluster == "slurm":
        from launcher.backends.slurm_render import account, partition

        profile = backend.profile.slurm
        charged, part = account(spec, profile), partition(spec, profile)
        notes: list[str] = []
        usage = quota.slurm_usage(notes).get(charged, quota.Usage(charged))
        for note in notes:  # the policy's limits are checked all the same
            click.echo(f"warning: quota pre-check: {note}", err=True)
    elif cluster == "k8s":
        from launcher.quota_k8s import k8s_usage

        usage = k8s_usage(quota.load_policy(policy), context=getattr(backend, "kube_context", None)).get(spec.team)
    quota.precheck(spec, str(policy), usage, part, count)


def _follow_local(backend: Any, registry: Any, record: Any, verbose: bool = False) -> int:
    """Foreground local job: its log under a live progress bar (launcher/follow.py); Ctrl-C asks it to save
    and stop (a second Ctrl-C detaches)."""
    from launcher.follow import Follower

    ref = record.ref
    deadline = time.monotonic() + 30
    while not Path(ref.extra["log"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    interrupted = False
    with Follower(ref.name, ref.run_dir, verbose=verbose) as follower:
        while True:
            try:
                for line in backend.logs(ref, follow=True):
                    follower.line(line)
                break
            except KeyboardInterrupt:
                if interrupted:
                    follower.close()
                    click.echo(f"\ndetached; the job goes on: mbl status {ref.name}", err=True)
                    return 130
                interrupted = True
                click.echo("\ninterrupt: asking the job to save a checkpoint and stop (Ctrl-C again to detach)",
                           err=True)
                backend.cancel(ref)
                registry.save_extra(record, ref.extra)
    rc = backend.wait(ref, timeout=60)
    status = backend.status(ref)
    click.echo(f"{ref.name}: {status.state.value}" + (f" ({status.reason or status.detail})"
                                                      if status.reason or status.detail else ""), err=True)
    return 0 if rc == 0 else (rc or 1) if rc and rc < 256 else 1


def _lookup(job: str):
    registry = _registry()
    record = registry.get(job)
    return registry, record, _backend(record.backend)


def _row(record: Any, backend: Any, registry: Any = None, progress: bool = True,
         status: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """A job's state and progress: (the fields of `-o json`, the same in words for the tables). The progress
    is the run directory's: `progress=False` leaves it out (an older job of a run directory a newer one reuses).
    `status`: the job's JobStatus when the caller asked for many at once (`_rows`), else it is asked here."""
    from launcher.progress import Snapshot, snapshot

    try:
        status = status if status is not None else backend.status(record.ref)
        state, reason = status.state.value, status.reason or status.detail
    except MblError as exc:
        state, reason = "UNKNOWN", str(exc)
    else:
        if status.state.finished and "ended_at" not in record.extra and registry is not None:
            # First seen finished: the registry's GPU-hour report (Kubernetes keeps no accounting) ends here.
            registry.save_extra(record, {**record.extra, "ended_at": time.time()})
    now, running = time.time(), state == "RUNNING"
    snap = snapshot(record.run_dir) if progress else Snapshot()
    fields, words = snap.fields(now, running), snap.words(now, running)
    row = {
        "name": record.name, "backend": record.backend, "job_id": record.job_id, "state": state,
        "reason": reason, "team": record.team, "kind": record.kind, "gpus": record.gpus, **fields,
        "submitted": time.strftime("%Y-%m-%d %H:%M", time.localtime(record.submitted_at)),
        "run_dir": record.run_dir,
    }
    words = {**{k: "" if v is None else str(v) for k, v in row.items()}, **words,
             "reason": "; ".join(x for x in (reason, words["note"]) if x)}
    if snap.evaluation:
        e = snap.evaluation
        from launcher.progress import number

        values = ", ".join(f"{k} {number(v)}" for k, v in e.items()
                           if isinstance(v, (int, float)) and k not in ("step",))
        words["eval"] = f"{e.get('split', 'eval')} {values} (step {e.get('step')})"
    return row, words


# The columns of `mbl status` (every job) and `mbl list`: state, how far, how fast, when done, what was saved.
PROGRESS_COLUMNS = [("step", "STEP"), ("percent", "%"), ("loss", "LOSS"), ("tokens_per_s", "TOK/S"),
                    ("eta", "ETA"), ("checkpoint", "CKPT STEP"), ("attempt", "ATTEMPT")]


def _table(rows: list[dict[str, Any]], columns: list[str | tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    pairs = [c if isinstance(c, tuple) else (c, c.upper()) for c in columns]
    for _key, header in pairs:
        table.add_column(header)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c, _header in pairs))
    console = Console()
    if not console.is_terminal:  # piped or captured: don't cut names to 80 columns
        console = Console(width=max(console.width, 200))
    console.print(table)


def _status_card(row: dict[str, Any], words: dict[str, str]) -> None:
    """One job, for people: a two-column table of its state and progress, then its summary when done."""
    from rich.console import Console
    from rich.table import Table

    from launcher.summary import read_summary, summary_rows

    def pct(w: dict[str, str]) -> str:
        return f"{w['step']} ({w['percent']})" if w["percent"] else w["step"]

    lines = [
        ("job", f"{row['name']}   ({row['backend']} job {row['job_id']}, {row['kind']}, team {row['team']})"),
        ("state", row["state"] + (f"   attempt {words['attempt']}" if words["attempt"] else "")
         + (f"   ({row['reason']})" if row["reason"] else "")),
        ("step", pct(words)),
        ("training loss", words["loss"] + (f"   (lr {words['lr']})" if words["lr"] else "")),
        ("last evaluation", words.get("eval", "")),
        ("speed", f"{words['tokens_per_s']} tokens/s" if words["tokens_per_s"] else ""),
        ("ETA", words["eta"]),
        ("checkpoint", f"step {words['checkpoint']}" if words["checkpoint"] else ""),
        ("note", words["note"]),
        ("run dir", row["run_dir"]),
    ]
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in lines:
        if value:
            table.add_row(label, value, style="yellow" if label == "note" else None)
    summary = read_summary(row["run_dir"]) if row["state"] == "COMPLETED" else None
    if summary:
        table.add_row("", "")
        table.add_row("summary", "")
        for label, value in summary_rows(summary):
            table.add_row(f"  {label}", value)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    console.print(table)


def _rows(cluster: str | None, limit: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
    from launcher.backends import get_backend

    registry = _registry()
    records = registry.list(backend=cluster, limit=limit)  # newest first
    backends: dict[str, Any] = {}
    states: dict[int, Any] = {}
    for name in dict.fromkeys(r.backend for r in records):  # one query per backend (Slurm: one squeue, one sacct)
        backends[name] = get_backend(name)
        mine = [r for r in records if r.backend == name]
        try:
            states.update(zip((r.id for r in mine), backends[name].statuses([r.ref for r in mine])))
        except MblError as exc:  # its cluster cannot be asked at all (no squeue here): every job says why
            from launcher.backends.base import JobState, JobStatus

            states.update((r.id, JobStatus(JobState.UNKNOWN, str(exc))) for r in mine)
    # First seen finished: the registry's GPU-hour report ends them here (one transaction for all of them).
    now = time.time()
    registry.save_extras([(r, {**r.extra, "ended_at": now}) for r in records
                          if states[r.id].state.finished and "ended_at" not in r.extra])
    out, seen = [], set()
    for record in records:
        out.append(_row(record, backends[record.backend], None, progress=record.run_dir not in seen,
                        status=states[record.id]))
        seen.add(record.run_dir)
    _print_warnings(backends.values())
    return out


def _print_warnings(backends: Any) -> None:
    """What a backend could not ask its cluster (a daemon down), on stderr, once: stdout stays parseable."""
    for backend in backends:
        for text in getattr(backend, "warnings", []):
            click.echo(f"warning: {text}", err=True)


@cli.command()
@click.argument("job", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(job: str | None, output: str) -> None:
    """State and progress of one job (by name or cluster id), or of the newest jobs.

    \b
    Shows the state (for a pending job, why it waits), step/total, percent, training loss, tokens/s,
    ETA, the newest checkpoint and its age, the attempt, and flags a running job whose metrics stopped
    moving for much longer than usual as possibly stuck. `-o json` has the same fields as numbers.
    Example:
      mbl status tiny-pretrain
      mbl status -o json
    """
    if job:
        registry, record, backend = _lookup(job)
        row, words = _row(record, backend, registry)
        _print_warnings([backend])
        if output == "json":
            click.echo(json.dumps(row, indent=2))
        else:
            _status_card(row, words)
        return
    rows = _rows(None, 20)
    if output == "json":
        click.echo(json.dumps([r for r, _w in rows], indent=2))
        return
    _table([w for _r, w in rows], ["name", "backend", "job_id", "state", *PROGRESS_COLUMNS, ("reason", "REASON")])


@cli.command(name="list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--cluster", "-c", type=click.Choice(CLUSTERS), default=None, help="Only jobs of this backend.")
@click.option("--limit", type=int, default=50, show_default=True)
def list_(output: str, cluster: str | None, limit: int) -> None:
    """Submitted jobs, newest first, with their state and progress."""
    rows = _rows(cluster, limit)
    if output == "json":
        click.echo(json.dumps([r for r, _w in rows], indent=2))
        return
    _table([w for _r, w in rows], ["name", "backend", "job_id", "state", *PROGRESS_COLUMNS, "team", "submitted",
                                   ("reason", "REASON")])


@cli.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the job writes.")
@click.option("--rank", type=int, default=None, help="k8s: the pod of this rank (default: the master).")
@click.option("--verbose", "-v", is_flag=True, help="Every line (default: hide known-harmless library warnings "
              "and lines repeated by every rank; the log file keeps them).")
def logs(job: str, follow: bool, rank: int | None, verbose: bool) -> None:
    """Print a job's log (the current attempt); with -f, follow it under a live progress bar.

    \b
    Example:
      mbl logs -f tiny-pretrain          # Ctrl-C stops following, not the job
      mbl logs -v tiny-pretrain > all.log
    """
    from launcher.follow import Follower

    _registry_, record, backend = _lookup(job)
    with Follower(record.name, record.run_dir, verbose=verbose, live=None if follow else False) as follower:
        try:
            for line in backend.logs(record.ref, follow=follow, rank=rank):
                follower.line(line)
        except KeyboardInterrupt:
            pass


@cli.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Stop a job: it saves a checkpoint where the cluster allows, then ends."""
    registry, record, backend = _lookup(job)
    ref = record.ref
    if backend.cancel(ref):
        registry.save_extra(record, ref.extra)
        click.echo(f"cancelled {record.name} ({record.backend} job {record.job_id})")
    else:
        click.echo(f"{record.name} had already finished; nothing to cancel")


@cli.command()
@click.option("--pipeline", is_flag=True, help="The schema of a pipeline spec (kind: pipeline) instead.")
def schema(pipeline: bool) -> None:
    """Print the spec's JSON Schema (Draft 2020-12), for editors' YAML completion.

    \b
    Example (VS Code, redhat.vscode-yaml):
      mbl schema > mbl.schema.json
      # first line of a spec:  # yaml-language-server: $schema=./mbl.schema.json
      mbl schema --pipeline > mbl-pipeline.schema.json
    """
    if pipeline:
        from launcher.pipeline import json_schema as pipeline_schema

        click.echo(json.dumps(pipeline_schema(), indent=2))
        return
    from launcher.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command()
@click.argument("pipeline_path", metavar="PIPELINE", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="The same overrides the pipeline was submitted with (they name nothing, but must validate).")
@click.option("-o", "--output", type=click.Choice(["table", "json", "csv"]), default="table")
def results(pipeline_path: str, sets: tuple[str, ...], output: str) -> None:
    """Per stage of a pipeline: every point's metrics (from its summary.json), the best point by the spec's
    metric, mean ± std over seeds, and where the best model is.

    \b
    The best point is picked on the validation split by task.metric (a pretrain: held-out loss); the test
    metric and the task's trivial baseline stand beside it.
    Example:
      mbl results examples/pipeline-tiny.yaml
      mbl results examples/pipeline-tiny.yaml -o csv > results.csv
    """
    from launcher.pipeline import load_pipeline
    from launcher.results import print_tables, results as collect, to_csv

    if not _is_pipeline(pipeline_path):
        raise UsageError(f"{pipeline_path} is not a pipeline spec (kind: pipeline)",
                         hint="for one job, `mbl status NAME` shows its summary")
    data = collect(load_pipeline(pipeline_path, list(sets)))
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "csv":
        click.echo(to_csv(data), nl=False)
    else:
        print_tables(data)


@cli.command(name="export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--onnx", is_flag=True, help="Export final/ to ONNX and check it against PyTorch.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", help="Dynamic int8 quantization.")
def export(run_dir: str, onnx: bool, quantize: str) -> None:
    """Export a finished run's model (ONNX, int8) with the trainer's Python environment.

    \b
    Example:
      mbl export runs/tiny-finetune --onnx --quantize int8
    """
    if not onnx:
        what = "--quantize int8 quantizes the ONNX export, and --onnx is missing" if quantize != "none" else \
            "nothing to export: no export flag given"
        raise UsageError(what, hint="the flags: --onnx (final/ to ONNX, checked against PyTorch), --quantize int8 "
                                    "(with --onnx: a dynamically quantized copy too); e.g. mbl export "
                                    f"{run_dir} --onnx --quantize int8")
    cmd = [sys.executable, "-m", "jobs.export", run_dir]
    if onnx:
        cmd.append("--onnx")
    if quantize != "none":
        cmd += ["--quantize", quantize]
    rc = subprocess.call(cmd)
    if rc:
        sys.exit(rc if rc < 256 else 1)


@cli.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default="mbl-plot.png", show_default=True,
              help="The PNG to write.")
@click.option("--stage", "stages", multiple=True, metavar="NAME",
              help="With a pipeline file: only the points of this stage (repeatable).")
def plot(runs: tuple[str, ...], out: str, stages: tuple[str, ...]) -> None:
    """A PNG of training loss, evaluations, tokens/s and learning rate of runs, to compare them at a glance.

    \b
    RUN is a run directory, the name of a submitted job, or a pipeline file (every point of its stages that
    has logged steps: a sweep's points side by side). For interactive curves, TensorBoard reads each run's
    tb/ folder: tensorboard --logdir runs/
    Examples:
      mbl plot runs/tiny-pretrain runs/tiny-finetune -o curves.png
      mbl plot examples/pipeline-tiny.yaml --stage classify -o classify.png
    """
    from launcher.plot import plot as draw

    found = []
    for run in runs:
        path = Path(run)
        if path.is_dir():
            found.append((_run_label(path), path))
            continue
        if path.is_file() and _is_pipeline(run):
            found += _pipeline_runs(run, stages)
            continue
        try:
            record = _registry().get(run)
        except MblError:
            raise UsageError(f"{run}: neither a run directory nor a submitted job",
                             hint="give a run directory (runs/NAME) or a name from `mbl list`") from None
        found.append((record.name, Path(record.run_dir)))
    click.echo(f"wrote {draw(found, Path(out))}")


def _pipeline_runs(path: str, stages: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(label, run directory) of every point of a pipeline's stages (or of `stages`) that has logged steps."""
    from launcher import contract
    from launcher.pipeline import load_pipeline

    pipeline = load_pipeline(path)
    names = [s.name for s in pipeline.stages]
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise UsageError(f"--stage {unknown[0]}: {path} has no such stage", hint=f"its stages: {', '.join(names)}")
    found = [(f"{p.stage} {p.label}" if p.label else p.stage, Path(p.run_dir))
             for s in pipeline.stages if not stages or s.name in stages for p in s.points
             if (Path(p.run_dir) / contract.METRICS_FILE).exists()]
    if not found:
        raise UsageError(f"{path}: no point of {', '.join(stages) or 'any stage'} has logged steps yet",
                         hint=f"run it first: mbl submit {path}")
    return found


def _run_label(run_dir: Path) -> str:
    """The job name of a run directory's spec, else the directory's name."""
    import yaml

    from launcher.contract import SPEC_FILE

    try:
        name = (yaml.safe_load((run_dir / SPEC_FILE).read_text()) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name or run_dir.resolve().name)


# ---- quotas --------------------------------------------------------------------------------------


@cli.group()
def quota() -> None:
    """Team GPU quotas: see use against limits, enforce a policy, report GPU-hours.

    \b
    The policy file is --policy, else $MBL_QUOTA_POLICY, else ~/.config/mbl/quota.yaml.
    Examples:
      mbl quota show --cluster slurm
      mbl quota apply --cluster slurm policy.yaml --yes
      mbl quota render --k8s policy.yaml | kubectl apply -f -
      mbl quota report --since 2026-11-01 --by team -o csv
    """


def _need_policy(path: str | None) -> Any:
    from launcher.quota import load_policy

    found = _policy_path(path)
    if found is None:
        raise UsageError("no quota policy", hint="pass --policy FILE or set MBL_QUOTA_POLICY")
    return load_policy(found)


@quota.command("show")
@click.option("--team", default=None, help="Only this team.")
@click.option("--cluster", "-c", type=click.Choice(["slurm", "k8s"]), default="slurm", show_default=True)
@click.option("--context", "kube_context", default=None, help="k8s: kubeconfig context.")
@click.option("--policy", type=click.Path(dir_okay=False), default=None, help="Quota policy file.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def quota_show(team: str | None, cluster: str, kube_context: str | None, policy: str | None, output: str) -> None:
    """Live GPU use against each team's limit (running and pending jobs).

    \b
    Slurm: GPUs of running and pending jobs per account (squeue), limits from sacctmgr (GrpTRES).
    Kubernetes: the teams' ResourceQuota use and limit, GPUs of suspended or not yet started
    PyTorchJobs, the Kueue ClusterQueue quota (needs the policy, for the team namespaces).
    """
    from launcher import quota as q

    found = _policy_path(policy)
    loaded = q.load_policy(found) if found else None
    notes: list[str] = []
    if cluster == "k8s":
        if loaded is None:
            raise UsageError("quota show --cluster k8s needs the policy (it names the teams' namespaces)",
                             hint="pass --policy FILE or set MBL_QUOTA_POLICY")
        from launcher.quota_k8s import k8s_usage

        usage = k8s_usage(loaded, context=kube_context)
        for use in usage.values():
            notes += [n for n in use.notes if n not in notes]
    else:
        usage = q.slurm_usage(notes)
    rows = q.show_rows(loaded, usage, team)
    if output == "json":
        click.echo(json.dumps({"teams": rows, "notes": notes} if notes else rows, indent=2))
        return
    _table(rows, ["team", "running_gpus", "pending_gpus", "limit", "free", "cluster_limit", "jobs"])
    for note in notes:
        click.echo(f"note: {note}", err=True)


@quota.command("apply")
@click.argument("policy_path", metavar="POLICY", type=click.Path(exists=True, dir_okay=False))
@click.option("--cluster", "-c", type=click.Choice(["slurm"]), default="slurm", show_default=True)
@click.option("--yes", is_flag=True, help="Run the commands (default: print them).")
def quota_apply(policy_path: str, cluster: str, yes: bool) -> None:
    """The sacctmgr commands that make Slurm enforce POLICY; printed, or run with --yes."""
    from launcher import quota as q

    for line in q.slurm_apply(q.load_policy(policy_path), run=yes):
        click.echo(("ran: " if yes else "") + line)


@quota.command("render")
@click.argument("policy_path", metavar="POLICY", type=click.Path(exists=True, dir_okay=False))
@click.option("--k8s", "k8s", is_flag=True, default=True, help="Kubernetes objects (the only target).")
def quota_render(policy_path: str, k8s: bool) -> None:
    """ResourceQuota and Kueue ResourceFlavor / ClusterQueue / LocalQueue objects for POLICY."""
    from launcher import quota as q
    from launcher.quota_k8s import k8s_yaml

    click.echo(k8s_yaml(q.load_policy(policy_path)), nl=False)


@quota.command("report")
@click.option("--since", required=True, help="Start date, YYYY-MM-DD[THH:MM].")
@click.option("--by", type=click.Choice(["team", "user", "job"]), default="team", show_default=True)
@click.option("--cluster", "-c", type=click.Choice(["slurm", "k8s"]), default="slurm", show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "csv", "json"]), default="table")
def quota_report(since: str, by: str, cluster: str, output: str) -> None:
    """GPU-hours since a date: from sacct (Slurm) or from the job registry (Kubernetes)."""
    from datetime import datetime

    from launcher import quota as q

    try:
        datetime.fromisoformat(since)
    except ValueError:
        raise UsageError(f"--since {since!r} is not a date", hint="use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    notes: list[str] = []
    if cluster == "slurm":
        rows = q.aggregate(q.slurm_report_rows(since, notes), by)
    else:  # the end of jobs nobody asked about since they finished, from the cluster
        backend = _backend("k8s")

        def ended_at(record: Any) -> float | None:
            try:
                return backend.ended_at(record.ref)
            except MblError as exc:
                click.echo(f"warning: {record.name}: end unknown ({exc}); counted up to now", err=True)
                return None

        rows = q.aggregate(q.registry_report_rows(since, ended_at=ended_at), by)
    if output == "json":
        click.echo(json.dumps({"rows": rows, "notes": notes} if notes else rows, indent=2))
    elif output == "csv":
        click.echo(q.to_csv(rows), nl=False)
    else:
        _table(rows, [by, "jobs", "gpu_hours"])
    for note in notes:
        click.echo(f"note: {note}", err=True)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script.

    \b
    Example:
      eval "$(mbl completion bash)"
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # click ships all three
    click.echo(cls(cli, {}, "mbl", "_MBL_COMPLETE").source())


def main() -> None:
    cli(prog_name="mbl")


if __name__ == "__main__":
    main()
