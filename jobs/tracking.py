"""Experiment tracking beside metrics.jsonl and TensorBoard: MLflow and Weights & Biases (the spec's `tracking:`).

Rank 0 sends what `Context.record` writes to metrics.jsonl: every row's numbers as `<split>/<name>` (split
`train` unless the row names one: `heldout`, `validation`, `test`) at the row's `step`; the resolved spec,
flattened (`train.lr`), as params once; the summary (`summary/<name>`) when the job finishes. `env` and
`secrets` are left out of the params.

One tracker run per run directory. Its id is made once, on the first start, from the job's identity: the job
name, the training fingerprint and a random token, `<name>-<fingerprint[:8]>-<token>`, and kept in
<run_dir>/tracking.json with the MLflow run id. Never from a Slurm or Kubernetes job id, which change on a
requeue: every attempt and resume of the run directory reads the id back and appends to the same run (MLflow:
the stored run id, else the run tagged `mbl.run_key`; W&B: `wandb.init(id=..., resume="allow")`). The token
keeps a run directory that was deleted and started again, or a copy of the spec in another run directory, off
the old run's curves.

No step twice. tracking.json also holds, per tracker and split, the last step the tracker took. A row at or
below it is not sent again: after a crash the job resumes from its last checkpoint and repeats the steps since
(metrics.jsonl then holds both), and the tracker keeps the values it got first, as W&B itself does with a step
it has seen. At its first row of an attempt a tracker is sent the rows of metrics.jsonl above its steps, so a
tracker that was down, or turned on in the middle of a run (`tracking` is not part of the fingerprint), catches
up with the whole history. A W&B step is the training step (`log(step=...)`), so offline attempts, each a
folder `<dir>/wandb/offline-run-*-<id>`, join into one run when synced (`wandb sync`).

Failures. A missing package (mlflow, wandb) stops the job at its start on every rank with exit code 2 and the
fix: the user asked for tracking, and finding out hours later that none happened is worse. Any error of a
tracker while the job runs (a server that does not answer, a full disk, a bad key) is a warning in the log and
never stops training: the run's record is safe in metrics.jsonl and TensorBoard, and a GPU job should not die
or stall for its dashboard. The tracker is tried again RETRY_SECONDS later, and then catches up from
metrics.jsonl, so an outage leaves no gap. MLflow's HTTP retries are bounded (MLFLOW_HTTP_REQUEST_MAX_RETRIES 2,
MLFLOW_HTTP_REQUEST_TIMEOUT 30 s unless the job's environment sets them), which bounds the stall of one failure;
W&B sends from its own process.

Offline: MLflow's local file store (`tracking.mlflow.uri: file:///...` or a path; MLflow 3 needs
MLFLOW_ALLOW_FILE_STORE=true for it, which is set here), W&B's `mode: offline` (or WANDB_MODE=offline).
Credentials come from `secrets` as environment variables (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, or the entry
named by `tracking.wandb.api_key_secret`); their values are never logged and are struck out of error messages.

This module imports nothing heavy at import time: mlflow and wandb are imported when a tracker starts.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from launcher import contract

RETRY_SECONDS = 300.0
REQUEUE_STATUS = {0: "FINISHED", contract.REQUEUE_EXIT_CODE: "KILLED"}  # else FAILED
_SKIP = ("step", "time", "total_steps", "split")  # row fields that are no metric (as TensorBoard)
_CREDENTIALS = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
_OPEN: list["Tracker"] = []  # trackers with a run open, closed by close_trackers (jobs.train's exit) or atexit


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def spec_config(spec) -> dict[str, Any]:
    """The resolved spec, flattened (`train.lr`), without `env` and `secrets`."""
    data = spec.model_dump(mode="json")
    for key in ("env", "secrets"):
        data.pop(key, None)
    return flatten(data)


def spec_params(spec) -> dict[str, str]:
    """spec_config as MLflow params: strings (JSON but for strings), at most 500 characters."""
    out = {}
    for key, value in spec_config(spec).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text if len(text) <= 500 else text[:497] + "..."
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def row_metrics(row: dict) -> tuple[str, int, float, dict[str, float]]:
    """(split, step, time, {"<split>/<name>": value}) of a metrics.jsonl row."""
    split = str(row.get("split", "train"))
    values = {f"{split}/{k}": v for k, v in ((k, _number(v)) for k, v in row.items() if k not in _SKIP)
              if v is not None}
    return split, int(row["step"]), float(row.get("time") or time.time()), values


def summary_metrics(summary: dict) -> dict[str, float]:
    return {f"summary/{k}": v for k, v in ((k, _number(v)) for k, v in flatten(summary).items()) if v is not None}


def _redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` with the values of the credential variables struck out."""
    for name in (*_CREDENTIALS, *extra):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _shown_uri(uri: str) -> str:
    """A URI for the log: without user and password."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _inside(run_dir: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else run_dir / p


# ---- the trackers ------------------------------------------------------------------------------------------


class _Backend:
    """One tracker. open() finds or makes the run, send() takes rows, summary() and end() close it."""

    name = ""
    package = ""

    def __init__(self, cfg, spec, run_dir: Path, log: Callable[[str], None]):
        self.cfg, self.spec, self.run_dir, self.log = cfg, spec, run_dir, log
        self.opened, self.behind, self.retry_at, self.closed = False, True, 0.0, False

    def target(self) -> dict:
        """What identifies where the runs go; when it changes, the steps sent before count for nothing."""
        raise NotImplementedError

    def open(self, entry: dict, key: str) -> str:
        raise NotImplementedError

    def send(self, rows: list[tuple[str, int, float, dict[str, float]]]) -> None:
        raise NotImplementedError

    def summary(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def end(self, code: int) -> None:
        raise NotImplementedError


class _Mlflow(_Backend):
    name, package = "mlflow", "mlflow"

    def __init__(self, cfg, spec, run_dir, log):
        super().__init__(cfg, spec, run_dir, log)
        uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
        if "://" not in uri and uri not in ("databricks", "databricks-uc") and not uri.startswith("databricks:"):
            uri = _inside(run_dir, uri).resolve().as_uri()  # a plain path: a file store
        self.uri, self.client, self.run_id = uri, None, None

    def target(self) -> dict:
        return {"uri": self.uri, "experiment": self.cfg.experiment}

    def open(self, entry: dict, key: str) -> str:
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            os.environ.setdefault(name, value)
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        run = None
        if entry.get("run_id"):
            try:
                run = client.get_run(entry["run_id"])
            except MlflowException as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store did not answer: try again later, never make a second run
            if run is not None and run.info.lifecycle_stage == "deleted":
                run = None
        how = "resumed"
        if run is None:
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                try:
                    exp_id = client.create_experiment(self.cfg.experiment)
                except MlflowException:  # made by another job meanwhile
                    exp_id = client.get_experiment_by_name(self.cfg.experiment).experiment_id
            else:
                exp_id = exp.experiment_id
            found = client.search_runs([exp_id], filter_string=f"tags.`mbl.run_key` = '{key}'", max_results=1)
            if found:
                run, how = found[0], "found"  # made by an attempt that ended before it wrote tracking.json
            else:
                tags = {"mbl.run_key": key, "mbl.job": self.spec.name, "mbl.kind": str(self.spec.kind),
                        "mbl.fingerprint": self.spec.training_fingerprint(), "mbl.run_dir": str(self.run_dir)}
                run = client.create_run(exp_id, run_name=self.cfg.run_name or self.spec.name, tags=tags)
                params = [Param(re.sub(r"[^\w\-. /]", "_", k), v) for k, v in spec_params(self.spec).items()]
                for i in range(0, len(params), 100):
                    client.log_batch(run.info.run_id, params=params[i:i + 100])
                how = "new"
            if how == "new" or entry.get("run_id", run.info.run_id) != run.info.run_id:
                entry["steps"] = {}  # a run that has nothing of what was sent before
            entry["run_id"] = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        self.client, self.run_id = client, run.info.run_id
        return f"{how} run {self.run_id} in experiment {self.cfg.experiment!r} at {_shown_uri(self.uri)}"

    def send(self, rows) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, int(t * 1000), step) for _, step, t, values in rows for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def summary(self, values, step) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def end(self, code) -> None:
        self.client.set_terminated(self.run_id, status=REQUEUE_STATUS.get(code, "FAILED"))


class _Wandb(_Backend):
    name, package = "wandb", "wandb"

    def __init__(self, cfg, spec, run_dir, log):
        super().__init__(cfg, spec, run_dir, log)
        self.dir = _inside(run_dir, cfg.dir) if cfg.dir else run_dir
        self.run = None

    def target(self) -> dict:
        return {"project": self.cfg.project, "entity": self.cfg.entity}

    def open(self, entry: dict, key: str) -> str:
        import wandb

        options: dict[str, Any] = {"console": "off"}  # the attempt's log is the run directory's
        if self.cfg.mode:
            options["mode"] = self.cfg.mode
        if self.cfg.api_key_secret:
            value = os.environ.get(self.cfg.api_key_secret)
            if value:
                options["api_key"] = value
            elif (self.cfg.mode or os.environ.get("WANDB_MODE", "online")) != "offline":
                self.log(f"warning: tracking: ${self.cfg.api_key_secret} (tracking.wandb.api_key_secret) is not set "
                         "in the job's environment; W&B looks for a key itself")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, id=key, resume="allow",
                              name=self.cfg.run_name or self.spec.name, dir=str(self.dir),
                              settings=wandb.Settings(**options))
        self.run.config.update(spec_config(self.spec), allow_val_change=True)  # the current attempt's values
        entry["id"] = key
        mode = self.run.settings.mode
        return f"run {key} in project {self.cfg.project!r} ({mode}, {self.dir})"

    def send(self, rows) -> None:
        for _, step, _, values in rows:
            self.run.log(values, step=step)

    def summary(self, values, step) -> None:
        self.run.summary.update(values)

    def end(self, code) -> None:
        run, self.run = self.run, None
        run.finish(exit_code=code)


BACKENDS = {"mlflow": _Mlflow, "wandb": _Wandb}


# ---- one per job -------------------------------------------------------------------------------------------


class Tracker:
    """The trackers of a job (rank 0; on the other ranks, and without a `tracking` section, it does nothing)."""

    def __init__(self, spec, run_dir: Path, log: Callable[[str], None], rank: int):
        from jobs.errors import DataError

        wanted = {name: getattr(spec.tracking, name) for name in BACKENDS}
        wanted = {name: cfg for name, cfg in wanted.items() if cfg is not None and spec.kind != "prepare"}
        missing = [name for name in wanted if importlib.util.find_spec(BACKENDS[name].package) is None]
        if missing:  # on every rank alike, so that they all stop with the same message
            raise DataError(f"tracking.{missing[0]} is set, but this environment has no {missing[0]} package",
                            "install the tracking extra (pip install 'mbl[tracking]'; the trainer image has it), "
                            f"or remove tracking.{missing[0]}")
        self.run_dir, self.log = Path(run_dir), log
        active = wanted if rank == 0 else {}
        self.backends = [BACKENDS[name](cfg, spec, self.run_dir, log) for name, cfg in active.items()]
        self.spec, self.state = spec, None

    # -- tracking.json

    def _load(self) -> dict:
        if self.state is None:
            path = self.run_dir / contract.TRACKING_FILE
            self.state = json.loads(path.read_text()) if path.exists() else {}
            if not self.state.get("key"):  # the first start of this run directory: the id is made once
                self.state["key"] = f"{self.spec.name}-{self.spec.training_fingerprint()[:8]}-{secrets.token_hex(3)}"
                self._save()
        return self.state

    def _save(self) -> None:
        path = self.run_dir / contract.TRACKING_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @property
    def key(self) -> str:
        return self._load()["key"]

    def _entry(self, backend: _Backend) -> dict:
        entry = self._load().setdefault(backend.name, {})
        if entry.get("target") != backend.target():  # a new store or project: a new run, everything sent again
            entry.clear()
            entry["target"] = backend.target()
        return entry

    # -- rows

    def _history(self) -> list[dict]:
        path = self.run_dir / contract.METRICS_FILE
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
        return rows

    def _push(self, backend: _Backend, rows: list[dict]) -> None:
        """Send the rows above the tracker's last steps, in step order; then remember the new last steps."""
        entry = self._entry(backend)
        steps = dict(entry.get("steps", {}))
        fresh = []
        for row in rows:
            split, step, t, values = row_metrics(row)
            if step > steps.get(split, -1):
                steps[split] = step
                if values:
                    fresh.append((split, step, t, values))
        if fresh:
            backend.send(sorted(fresh, key=lambda r: r[1]))
        if steps != entry.get("steps"):
            entry["steps"] = steps
            self._save()

    def _attempt(self, backend: _Backend, row: dict | None, now: bool = False) -> bool:
        """Open the tracker if it is not, catch up or send `row`; on an error warn and try again later."""
        if backend.closed or (not now and time.time() < backend.retry_at):
            return False
        try:
            if not backend.opened:
                entry = self._entry(backend)
                said = backend.open(entry, self.key)
                self._save()
                backend.opened, backend.behind = True, True
                atexit.unregister(close_trackers)  # registered after the libraries' own hooks: it runs before them
                atexit.register(close_trackers, 1)
                if self not in _OPEN:
                    _OPEN.append(self)
                sent = ", ".join(f"{k} {v}" for k, v in sorted(entry.get("steps", {}).items()))
                self.log(f"tracking: {backend.name} {said}" + (f"; it has the steps up to {sent}" if sent else ""))
            if backend.behind:
                self._push(backend, self._history())  # the rows it has not got yet, this one included
                backend.behind = False
            elif row is not None:
                self._push(backend, [row])
            return True
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training; see the module docstring
            backend.behind, backend.retry_at = True, time.time() + RETRY_SECONDS
            extra = (backend.cfg.api_key_secret,) if getattr(backend.cfg, "api_key_secret", None) else ()
            message = _redact(f"{type(exc).__name__}: {exc}", extra).replace("\n", " ")[:400]
            self.log(f"warning: tracking: {backend.name} failed ({message}); training goes on, {backend.name} is "
                     f"tried again in {RETRY_SECONDS / 60:.0f} min and then gets the rows it missed from "
                     f"{contract.METRICS_FILE}")
            return False

    def record(self, row: dict) -> None:
        """A row just written to metrics.jsonl (rank 0)."""
        for backend in self.backends:
            self._attempt(backend, row)

    def finish(self, summary: dict) -> None:
        """The end of the job: last rows, the summary, and the runs closed as finished."""
        for backend in self.backends:
            if not self._attempt(backend, None, now=True):
                continue
            entry = self._entry(backend)
            try:
                if not entry.get("summary"):
                    step = max(entry.get("steps", {}).values(), default=0)
                    backend.summary(summary_metrics(summary), step)
                    entry["summary"] = True
                    self._save()
            except Exception as exc:  # noqa: BLE001
                self.log(f"warning: tracking: {backend.name} did not take the summary "
                         f"({_redact(f'{type(exc).__name__}: {exc}')[:300]})")
        self.close(0)

    def close(self, code: int) -> None:
        """End the open runs: FINISHED (0), KILLED (a requeue: the next attempt resumes it), else FAILED."""
        for backend in self.backends:
            if backend.opened and not backend.closed:
                backend.closed = True
                try:
                    backend.end(code)
                except Exception as exc:  # noqa: BLE001
                    self.log(f"warning: tracking: {backend.name} did not close ({_redact(str(exc))[:300]})")
        if self in _OPEN:
            _OPEN.remove(self)


def close_trackers(code: int) -> None:
    """End every open tracker run with the job's exit code (jobs.train, before os._exit skips atexit)."""
    for tracker in list(_OPEN):
        tracker.close(code)
