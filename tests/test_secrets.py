"""Secrets are referenced, never written: a secret with a distinctive value reaches the job's environment on
every backend, and appears in no rendered file, no registry, no log, no run-directory file, no output of mbl.

- local: a real tiny job (a one-rank `prepare`) through `mbl submit`; the secret comes from a file
  (`secrets.NAME.file`), which the launcher reads into the job's environment.
- Slurm: the same job on the local cluster; the batch script reads the file at run time. Also searched:
  Slurm's own logs, state and spool, `scontrol show job` and `sacct` of the job.
- Kubernetes: `mbl render --k8s` and `mbl submit --k8s` against kmock; the pods get the value from the
  Kubernetes Secret (secretKeyRef), so the value never passes through mbl: the test puts it in the server's
  Secret and checks that the job's env resolves to it, and that no request mbl sent carries it.

Delivery is observed, not assumed: a `sitecustomize.py` on the job's PYTHONPATH records, in every Python
process of the job (jobs.launch, the torchrun rank running jobs.train), the SHA-256 of what the process
finds in the secret's variable, into a folder outside everything searched.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from launcher.cli import cli

REPO = Path(__file__).resolve().parents[1]
VAR = "MBL_TEST_SECRET"
SITECUSTOMIZE = '''\
"""Test probe (tests/test_secrets.py): what this process finds in the secret's variable, as a hash."""
import hashlib, os, sys
_proof = os.environ.get("MBL_TEST_PROOF_DIR")
if _proof:
    _value = os.environ.get("MBL_TEST_SECRET")
    _seen = "absent" if _value is None else hashlib.sha256(_value.encode()).hexdigest()
    with open(os.path.join(_proof, f"{os.getpid()}.json"), "w") as _fh:
        _fh.write(__import__("json").dumps({"argv": sys.orig_argv, "sha256": _seen}))
'''


@pytest.fixture
def secret(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A distinctive value in a mode-600 file, a probe folder and the sitecustomize that fills it."""
    value = f"mbl-s3cr3t-{uuid.uuid4().hex}"
    assert value not in json.dumps(dict(os.environ))  # never in the environment mbl itself runs in
    source = tmp_path_factory.mktemp("secret-source")
    path = source / "token"
    path.write_text(value + "\n")
    path.chmod(0o600)
    site, proof = tmp_path_factory.mktemp("probe-site"), tmp_path_factory.mktemp("probe-out")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"value": value, "file": path, "site": site, "proof": proof}


def spec_doc(secret: dict[str, Any], name: str, run_dir: Path, **extra: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "prepare-tiny.yaml").read_text())
    doc.update(name=name, **extra)
    doc["data"]["train"] = [str(REPO / "examples" / "data" / "corpus.txt")]
    doc["distributed"]["gpus_per_node"] = 1
    doc["train"]["global_batch_size"] = 1
    doc["checkpoint"]["dir"] = str(run_dir)
    doc["env"] = {"PYTHONPATH": f"{secret['site']}:{REPO}", "MBL_TEST_PROOF_DIR": str(secret["proof"])}
    doc.setdefault("secrets", {})[VAR] = {"file": str(secret["file"]), "secret": "hf-token", "key": "token"}
    return doc


def needles(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, base64.b64encode(raw), base64.b64encode(raw + b"\n"), value.encode("utf-16-le")]


def leaks(value: str, roots: list[Path], texts: dict[str, str]) -> tuple[list[str], int]:
    """Where `value` (raw, base64 as in a Kubernetes Secret, UTF-16) appears: files under `roots`, `texts`.
    Returns (the places, the number of files read)."""
    found, read = [], 0
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            read += 1
            if any(n in data for n in needles(value)):
                found.append(str(path))
    found += [name for name, text in texts.items() if any(n.decode("latin-1") in text for n in needles(value))]
    return found, read


def delivered(secret: dict[str, Any]) -> list[str]:
    """The job's processes that found the secret's value in their environment (by its hash)."""
    want = hashlib.sha256(secret["value"].encode()).hexdigest()
    seen = [json.loads(p.read_text()) for p in secret["proof"].glob("*.json")]
    assert seen, "the probe saw no process of the job"
    return [" ".join(s["argv"]) for s in seen if s["sha256"] == want]


# ---- local ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_job_gets_the_secret_and_writes_it_nowhere(secret: dict[str, Any], tmp_path: Path,
                                                         _isolated_home: Path) -> None:
    run_dir = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(secret, "secret-local", run_dir)))

    def mbl(*args: str) -> Any:  # in this process (the job itself runs in its own, as always)
        return CliRunner().invoke(cli, list(args))

    rendered = mbl("render", str(spec), "-o", str(tmp_path / "rendered"))
    printed = mbl("render", str(spec))
    submitted = mbl("submit", str(spec))
    assert submitted.exit_code == 0, submitted.stdout[-3000:] + submitted.stderr
    assert "secret-local: COMPLETED" in submitted.stderr
    status, logs = mbl("status", "secret-local", "-o", "json"), mbl("logs", "secret-local")
    assert json.loads(status.stdout)["state"] == "COMPLETED"

    saw = delivered(secret)
    assert any("jobs.train" in argv for argv in saw), saw  # the rank had it in its environment
    texts = {f"mbl {what}": p.stdout + p.stderr for what, p in
             [("render -o", rendered), ("render", printed), ("submit", submitted), ("status", status), ("logs", logs)]}
    found, read = leaks(secret["value"], [run_dir, _isolated_home, tmp_path / "rendered"], texts)
    assert not found, f"the secret's value was written to: {found}"
    assert read >= 8 and (_isolated_home / "registry.db").exists() and list((run_dir / "logs").glob("*.log"))
    print(f"secrets (local): delivered to {len(saw)} process(es) of the job; {read} files and "
          f"{len(texts)} outputs searched, the value in none")


# ---- Slurm -----------------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_job_gets_the_secret_and_writes_it_nowhere(secret: dict[str, Any], cluster: dict) -> None:
    from slurm_util import mbl, slurm, wait_done

    name = f"t-secret-{uuid.uuid4().hex[:6]}"
    run_dir = cluster["work"] / "runs" / name
    spec = cluster["work"] / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(secret, name, run_dir, team="nlp",
                                            resources={"cpus_per_gpu": 1, "mem_per_node": "1G"})))
    profile = ["--profile", str(cluster["profile"])]
    rendered = mbl(cluster, "render", "--slurm", *profile, str(spec), "-o", str(cluster["work"] / f"{name}-rendered"))
    printed = mbl(cluster, "render", "--slurm", *profile, str(spec))
    submitted = mbl(cluster, "submit", "--slurm", *profile, str(spec))
    final = wait_done(cluster, name)
    assert final["state"] == "COMPLETED", final
    job_id = final["job_id"]
    logs = mbl(cluster, "logs", name)

    saw = delivered(secret)
    assert any("jobs.train" in argv for argv in saw), saw
    script = (run_dir / "job.sbatch").read_text()
    assert f'{VAR}="$(cat {secret["file"]})"' in script  # read on the node at run time, by reference
    texts = {f"mbl {what}": p.stdout + p.stderr for what, p in
             [("render -o", rendered), ("render", printed), ("submit", submitted), ("logs", logs)]}
    texts["scontrol show job"] = slurm(cluster, "scontrol", "show", "job", "-dd", job_id)
    texts["sacct"] = slurm(cluster, "sacct", "-j", job_id, "--parsable2", "--format=ALL")
    slurm_dir = Path(os.environ.get("MBL_SLURM_DIR", "/tmp/mbl-slurm"))
    roots = [run_dir, Path(cluster["env"]["MBL_HOME"]), cluster["work"] / f"{name}-rendered"]
    roots += [slurm_dir / d for d in ("log", "state", "spool") if (slurm_dir / d).exists()]
    found, read = leaks(secret["value"], roots, texts)
    assert not found, f"the secret's value was written to: {found}"
    assert read >= 10 and list((run_dir / "logs").glob("attempt-*.log"))
    print(f"secrets (Slurm): delivered to {len(saw)} process(es) of job {job_id}; {read} files (run dir, registry, "
          f"rendered, Slurm's logs, state, spool) and {len(texts)} outputs searched, the value in none")


# ---- Kubernetes ----------------------------------------------------------------------------------------------


async def test_k8s_objects_reference_the_secret_and_carry_it_nowhere(secret: dict[str, Any], tmp_path: Path,
                                                                     kmock: Any, _isolated_home: Path) -> None:
    kmock.resources["v1/pods"] = {}
    value = secret["value"]
    # the cluster side: the Secret holds the value (as `kubectl create secret` would have put it there)
    kmock.objects[("v1/secrets", "mbl", "hf-token")] = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": "mbl"},
        "data": {"token": base64.b64encode(value.encode()).decode()}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "me", "user": {"token": "not-the-secret"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "me", "namespace": "mbl"}}]}))
    spec = tmp_path / "spec.yaml"
    doc = spec_doc(secret, "secret-k8s", Path("/shared/runs/secret-k8s"), image="ghcr.io/mbl-project/trainer:1")
    doc["data"]["train"] = ["/shared/data/corpus.txt"]
    doc["env"] = {"HF_HOME": "/shared/hf"}
    spec.write_text(yaml.safe_dump(doc))
    env = {"KUBECONFIG": str(kubeconfig)}

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), env=env)

    rendered = await asyncio.to_thread(run, "render", "--k8s", str(spec), "-o", str(tmp_path / "rendered"))
    printed = await asyncio.to_thread(run, "render", "--k8s", str(spec))
    submitted = await asyncio.to_thread(run, "submit", "--k8s", str(spec))
    for result in (rendered, printed, submitted):
        assert result.exit_code == 0, result.stderr
    # delivered: the pods' env resolves, through the Secret on the server, to the value
    job = kmock.objects[("kubeflow.org/v1/pytorchjobs", "mbl", "secret-k8s")]
    [entry] = [e for e in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
               if e["name"] == VAR]
    ref = entry["valueFrom"]["secretKeyRef"]
    stored = kmock.objects[("v1/secrets", "mbl", ref["name"])]
    assert base64.b64decode(stored["data"][ref["key"]]).decode() == value and "value" not in entry
    # ... and nothing mbl sent or wrote carries it
    sent = {f"{r.method.value.upper()} {r.url.path} #{r.id}": r.body.decode("utf-8", "replace") for r in kmock}
    assert any(k.startswith("POST") and "pytorchjobs" in k for k in sent) and not any("secrets" in k for k in sent)
    texts = {**{f"request {k}": v for k, v in sent.items()},
             **{f"mbl {what}": r.stdout + r.stderr for what, r in
                [("render -o", rendered), ("render", printed), ("submit", submitted)]},
             "objects on the server": json.dumps([dict(o) for k, o in kmock.objects.items() if k[0] != "v1/secrets"],
                                                 default=str)}
    assert "secretKeyRef" in texts["objects on the server"] and "hf-token" in texts["objects on the server"]
    found, read = leaks(value, [tmp_path / "rendered", _isolated_home], texts)
    assert not found, f"the secret's value was written to: {found}"
    assert read >= 2
    print(f"secrets (Kubernetes): referenced by secretKeyRef {ref}; {len(sent)} requests, {read} files and the "
          "server's objects searched, the value in none")
