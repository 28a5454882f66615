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
    """Check spec files: types, ranges, unknown keys, batch arithmetic, names.

    \b
    Example:
      mbl validate examples/*.yaml
      mbl validate pretrain.yaml --set train.global_batch_size=4096
    """
    from launcher.loading import load_spec

    failed: list[SpecError] = []
    for path in specs:
        try:
            spec = load_spec(path, list(sets))
        except SpecError as exc:
            failed.append(exc)
            click.echo(exc.render(), err=True)
            continue
        if not quiet:
            click.echo(
                f"ok: {path}: {spec.kind} {spec.name!r}, {spec.distributed.nodes} node(s) x "
                f"{spec.distributed.gpus_per_node} GPU(s), global batch {spec.train.global_batch_size} = "
                f"{spec.train.micro_batch_size} x {spec.grad_accum} accumulation x {spec.distributed.world_size} ranks"
            )
    if failed:
        sys.exit(2)


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
    spec = _load(spec_path, sets, namespace)
    request = _backend(name, profile=profile, kube_context=kube_context).dryrun(spec)
    if out_dir:
        for path in request.write(Path(out_dir)):
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
def submit(spec_path: str, cluster: str | None, short: str | None, sets: tuple[str, ...], profile: str | None,
           kube_context: str | None, namespace: str | None, dry_run: bool, detach: bool, force: bool,
           no_quota_check: bool) -> None:
    """Validate, render and submit a job; the same request `render` prints.

    \b
    Examples:
      mbl submit examples/pretrain-tiny.yaml             # local, foreground, live progress
      mbl submit -d examples/pretrain-tiny.yaml          # local, in the background
      mbl submit --slurm examples/pretrain.yaml --set distributed.nodes=4
      mbl submit --k8s examples/finetune.yaml -n research
    """
    name = _cluster(cluster, short)
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
    sys.exit(_follow_local(backend, registry, record))


def _policy_path(explicit: str | None) -> Path | None:
    """--policy, else $MBL_QUOTA_POLICY, else ~/.config/mbl/quota.yaml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("MBL_QUOTA_POLICY"):
        return Path(os.environ["MBL_QUOTA_POLICY"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mbl" / "quota.yaml"
    return config if config.exists() else None


def _quota_precheck(cluster: str, spec: Any, backend: Any) -> None:
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
        usage = quota.slurm_usage().get(charged, quota.Usage(charged))
    elif cluster == "k8s":
        from launcher.quota_k8s import k8s_usage

        usage = k8s_usage(quota.load_policy(policy), context=getattr(backend, "kube_context", None)).get(spec.team)
    quota.precheck(spec, str(policy), usage, part)


def _follow_local(backend: Any, registry: Any, record: Any) -> int:
    """Foreground local job: stream its log; Ctrl-C asks it to save and stop (a second Ctrl-C detaches)."""
    ref = record.ref
    deadline = time.monotonic() + 30
    while not Path(ref.extra["log"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    interrupted = False
    while True:
        try:
            for line in backend.logs(ref, follow=True):
                click.echo(line, nl=False)
            break
        except KeyboardInterrupt:
            if interrupted:
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


def _metrics_tail(run_dir: str) -> dict[str, Any]:
    from launcher.contract import METRICS_FILE

    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode(errors="replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError, IndexError):
        return {}


def _row(record: Any, backend: Any, registry: Any = None) -> dict[str, Any]:
    try:
        status = backend.status(record.ref)
        state, reason = status.state.value, status.reason or status.detail
    except MblError as exc:
        state, reason = "UNKNOWN", str(exc)
    else:
        if status.state.finished and "ended_at" not in record.extra and registry is not None:
            # First seen finished: the registry's GPU-hour report (Kubernetes keeps no accounting) ends here.
            registry.save_extra(record, {**record.extra, "ended_at": time.time()})
    last = _metrics_tail(record.run_dir)
    return {
        "name": record.name, "backend": record.backend, "job_id": record.job_id, "state": state,
        "reason": reason, "team": record.team, "kind": record.kind, "gpus": record.gpus,
        "step": last.get("step"), "loss": last.get("loss"),
        "submitted": time.strftime("%Y-%m-%d %H:%M", time.localtime(record.submitted_at)),
        "run_dir": record.run_dir,
    }


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console = Console()
    if not console.is_terminal:  # piped or captured: don't cut names to 80 columns
        console = Console(width=max(console.width, 200))
    console.print(table)


@cli.command()
@click.argument("job", required=False)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(job: str | None, output: str) -> None:
    """State of one job (by name or cluster id), or of the newest jobs.

    \b
    Example:
      mbl status tiny-pretrain
      mbl status -o json
    """
    if job:
        registry, record, backend = _lookup(job)
        rows = [_row(record, backend, registry)]
    else:
        from launcher.backends import get_backend

        registry = _registry()
        backends: dict[str, Any] = {}
        rows = []
        for record in registry.list(limit=20):
            backend = backends.setdefault(record.backend, get_backend(record.backend))
            rows.append(_row(record, backend, registry))
    if output == "json":
        click.echo(json.dumps(rows if not job else rows[0], indent=2))
        return
    _table(rows, ["name", "backend", "job_id", "state", "reason", "step", "loss", "run_dir"])


@cli.command(name="list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--cluster", "-c", type=click.Choice(CLUSTERS), default=None, help="Only jobs of this backend.")
@click.option("--limit", type=int, default=50, show_default=True)
def list_(output: str, cluster: str | None, limit: int) -> None:
    """Submitted jobs, newest first, with their current state."""
    from launcher.backends import get_backend

    registry = _registry()
    backends: dict[str, Any] = {}
    rows = []
    for record in registry.list(backend=cluster, limit=limit):
        backend = backends.setdefault(record.backend, get_backend(record.backend))
        rows.append(_row(record, backend, registry))
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    _table(rows, ["name", "backend", "job_id", "state", "team", "kind", "gpus", "submitted"])


@cli.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the job writes.")
@click.option("--rank", type=int, default=None, help="k8s: the pod of this rank (default: the master).")
def logs(job: str, follow: bool, rank: int | None) -> None:
    """Print a job's log (the current attempt).

    \b
    Example:
      mbl logs -f tiny-pretrain
    """
    _registry_, record, backend = _lookup(job)
    try:
        for line in backend.logs(record.ref, follow=follow, rank=rank):
            click.echo(line, nl=not line.endswith("\n"))
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
def schema() -> None:
    """Print the spec's JSON Schema (Draft 2020-12), for editors' YAML completion.

    \b
    Example (VS Code, redhat.vscode-yaml):
      mbl schema > mbl.schema.json
      # first line of a spec:  # yaml-language-server: $schema=./mbl.schema.json
    """
    from launcher.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


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
    cmd = [sys.executable, "-m", "jobs.export", run_dir]
    if onnx:
        cmd.append("--onnx")
    if quantize != "none":
        cmd += ["--quantize", quantize]
    rc = subprocess.call(cmd)
    if rc:
        sys.exit(rc if rc < 256 else 1)


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
        usage = q.slurm_usage()
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
    if cluster == "slurm":
        rows = q.aggregate(q.slurm_report_rows(since), by)
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
        click.echo(json.dumps(rows, indent=2))
    elif output == "csv":
        click.echo(q.to_csv(rows), nl=False)
    else:
        _table(rows, [by, "jobs", "gpu_hours"])


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
