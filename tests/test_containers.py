"""The trainer image (images/build.sh) and the pieces around it.

- the image runs `python -m jobs.train --help` as uid 1000, from its venv, and carries its version and commit;
- a container start compiles nothing: DeepSpeed's CPU shared-memory op is built into the image, so two
  fresh containers that train load it and neither JIT-builds it (DeepSpeed logs "Time to load ... op" and
  torch creates TORCH_EXTENSIONS_DIR when it does);
- images/host_pip.py hands the host's pip configuration to the build (files, PIP_* variables, local paths);
- images/oci_config.py and images/oci-run, which make and finish the OCI bundle's config.json for Slurm;
- `mbl render --slurm` with container_runtime oci.

Tests that need podman and the image skip without them, except under scripts/test.sh (and so CI).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from container_util import IMAGE, VERSION, podman, require_image

ROOT = Path(__file__).resolve().parents[1]
JIT_MARKERS = ("Time to load deepspeed_shm_comm op", "Building extension module", "as PyTorch extensions root")
LOADED = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"  # printed by both paths


def _oci_run():
    loader = importlib.machinery.SourceFileLoader("oci_run", str(ROOT / "images" / "oci-run"))
    spec = importlib.util.spec_from_loader("oci_run", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# ---- the image ---------------------------------------------------------------------------------------


def test_image_runs_the_trainer_as_uid_1000_from_its_venv() -> None:
    image = require_image()
    out = podman("run", "--rm", image, "sh", "-c", "id -u; id -g; command -v python; python -m jobs.train --help")
    uid, gid, python, *usage = out.stdout.splitlines()
    assert (uid, gid) == ("1000", "1000")
    assert python == "/opt/venv/bin/python"
    assert "usage: python -m jobs.train" in "\n".join(usage)
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    assert labels["org.opencontainers.image.version"] == VERSION
    revision = labels["org.opencontainers.image.revision"]
    assert revision not in ("", "unknown")
    # Tagged with the version and with version-commit, one image.
    assert podman("image", "inspect", "--format", "{{.Id}}", f"{IMAGE.rsplit(':', 1)[0]}:{VERSION}-{revision}").stdout \
        == podman("image", "inspect", "--format", "{{.Id}}", image).stdout


def test_container_starts_compile_nothing(tmp_path: Path) -> None:
    image = require_image()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "examples" / "data" / "corpus.txt").read_text())
    logs, seconds = [], []
    for start in (1, 2):
        run_dir = tmp_path / f"run{start}"
        render = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "render", str(ROOT / "examples" / "pretrain-tiny.yaml"),
             "--set", f"checkpoint.dir={run_dir}", "--set", f"data.train=[{corpus}]", "--set", "train.max_steps=4",
             "--set", "checkpoint.every_steps=4", "--set", "train.eval_every_steps=4", "--set", "train.warmup_steps=1",
             "-o", str(run_dir)], capture_output=True, text=True, timeout=60, check=False)
        assert render.returncode == 0, render.stderr
        os.chown(tmp_path, 1000, 1000)
        subprocess.run(["chown", "-R", "1000:1000", str(run_dir)], check=True)
        t0 = time.monotonic()
        out = podman("run", "--rm", "-v", f"{tmp_path}:{tmp_path}", image, "sh", "-c",
                     f"python -m jobs.launch --spec {run_dir}/spec.yaml -- --standalone --nnodes=1 "
                     f"--nproc-per-node=2 --max-restarts=0; echo exit=$?; "
                     f"ls -d \"$TORCH_EXTENSIONS_DIR\" 2>/dev/null || echo no-extensions-dir", timeout=300)
        seconds.append(time.monotonic() - t0)
        logs.append(out.stdout + out.stderr)
    for log in logs:
        assert "exit=0" in log and "no-extensions-dir" in log, log[-3000:]
        assert log.count(LOADED) == 2, log[-3000:]  # both ranks loaded the op ...
        assert not [m for m in JIT_MARKERS if m in log], log[-3000:]  # ... and none built it
    print(f"container starts (tiny 4-step pre-train, 2 ranks): {seconds[0]:.0f}s, {seconds[1]:.0f}s")


# ---- the build's pip configuration -------------------------------------------------------------------


def test_host_pip_passes_config_env_and_local_paths(tmp_path: Path) -> None:
    wheels, index, constraints = tmp_path / "wheels", tmp_path / "mirror" / "simple", tmp_path / "constraints.txt"
    wheels.mkdir()
    index.mkdir(parents=True)
    constraints.write_text("torch<=2.14.1\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {wheels}\nextra-index-url = file://{index} https://pypi.example/simple\n"
                    f"constraint = {constraints}\ncache-dir = /var/cache/pip\n[install]\nuser = true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # this machine's own PIP_* aside
    env.update(PIP_CONFIG_FILE=str(conf), PIP_DEFAULT_TIMEOUT="99", PIP_CERT="/no/such/ca.pem")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "images" / "host_pip.py"), str(out), "--pip",
                    f"{sys.executable} -m pip"], env=env, check=True, capture_output=True, text=True)
    text = (out / "pip.conf").read_text()
    assert f"find-links = {wheels}" in text
    assert f"extra-index-url = file://{index} https://pypi.example/simple" in text
    assert f"constraint = {constraints}" in text
    assert "default-timeout = 99" in text  # a PIP_* variable
    assert "cache-dir" not in text and "user" not in text and "cert" not in text
    # The local paths are mounted: a `simple` index with its parent (its links are ../../files/...).
    assert sorted((out / "mounts").read_text().splitlines()) == sorted([str(wheels), str(index.parent), str(constraints)])
    assert (out / "ca.crt").read_bytes() != b""  # the system bundle, since PIP_CERT names no file

    subprocess.run([sys.executable, str(ROOT / "images" / "host_pip.py"), str(out), "--no-local", "--pip",
                    f"{sys.executable} -m pip"], env=env, check=True, capture_output=True, text=True)
    assert (out / "mounts").read_text() == ""
    assert "extra-index-url = https://pypi.example/simple" in (out / "pip.conf").read_text()


# ---- Slurm's OCI bundle ------------------------------------------------------------------------------


def test_bundle_config_and_per_step_finish(tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (images/setup.sh installs it)")
    subprocess.run(["runc", "spec"], cwd=tmp_path, check=True)
    image = {"Env": ["PATH=/opt/venv/bin:/usr/bin:/bin", "HOME=/home/mbl", "VIRTUAL_ENV=/opt/venv"],
             "User": "1000:1000", "WorkingDir": "/home/mbl", "Cmd": ["python", "-m", "jobs.train", "--help"]}
    (tmp_path / "image.json").write_text(json.dumps(image))
    subprocess.run([sys.executable, str(ROOT / "images" / "oci_config.py"), str(tmp_path / "config.json"),
                    str(tmp_path / "image.json")], check=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {ns["type"] for ns in config["linux"]["namespaces"]}.isdisjoint({"pid", "network", "uts"})
    assert config["root"] == {"path": "rootfs", "readonly": True} and config["process"]["user"] == {"uid": 1000,
                                                                                                 "gid": 1000}
    dests = {m["destination"]: m for m in config["mounts"]}
    assert dests["/etc/hosts"]["type"] == "bind" and dests["/tmp"]["type"] == "tmpfs" and "/home/mbl" in dests
    assert not [o for o in dests["/dev/shm"]["options"] if o.startswith("size=")]

    # What slurmstepd hands images/oci-run: the step's environment (the batch shell's PATH and venv).
    config["process"]["env"] = ["PATH=/work/.venv/bin:/usr/bin", "VIRTUAL_ENV=/work/.venv", "LD_LIBRARY_PATH=/x",
                                "PWD=/shared/u/sub", "SLURM_JOB_ID=7", "MBL_CONTAINER_MOUNTS=/shared:/shared;/d:/data:ro;rel:x"]
    oci_run = _oci_run()
    done = oci_run.finish(json.loads(json.dumps(config)), oci_run.env_dict(image["Env"]), 0, 0)
    env = oci_run.env_dict(done["process"]["env"])
    assert env["PATH"] == "/opt/venv/bin:/usr/bin:/bin" and env["VIRTUAL_ENV"] == "/opt/venv"
    assert "LD_LIBRARY_PATH" not in env and env["SLURM_JOB_ID"] == "7"
    binds = [(m["source"], m["destination"], m["options"]) for m in done["mounts"] if m["type"] == "bind"]
    assert ("/shared", "/shared", ["rbind", "rw"]) in binds and ("/d", "/data", ["rbind", "ro"]) in binds
    assert not [b for b in binds if b[0] == "rel"]
    assert done["process"]["cwd"] == "/shared/u/sub" and done["process"]["user"] == {"uid": 0, "gid": 0}
    assert "uidMappings" not in done["linux"]
    # Another user: rootless, root in a user namespace that maps only them.
    other = oci_run.finish(json.loads(json.dumps(config)), oci_run.env_dict(image["Env"]), 1234, 99)
    assert other["process"]["user"] == {"uid": 0, "gid": 0}
    assert other["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1234, "size": 1}]
    assert other["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 99, "size": 1}]
    assert {m["destination"]: m["type"] for m in other["mounts"]}["/proc"] == "none"


def test_render_slurm_oci(tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    subprocess.run([sys.executable, str(ROOT / "slurm" / "make_dev_profile.py"), "--runtime", "oci", "--shared-root",
                    "/shared", "-o", str(profile)], check=True)
    base = [sys.executable, "-m", "launcher.cli", "render", "--slurm", "--profile", str(profile),
            str(ROOT / "examples" / "pretrain-tiny.yaml"), "--set", "checkpoint.dir=/shared/runs/t",
            "--set", "data.train=[/shared/data/corpus.txt]", "--set", "slurm.container_mounts=[/scratch:/scratch:ro]"]
    out = subprocess.run([*base, "--set", "image=/shared/bundles/mbl", "-o", str(tmp_path / "r")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "r" / "job.sbatch").read_text()
    assert "--container=/shared/bundles/mbl" in script
    assert "'--export=ALL,MBL_CONTAINER_MOUNTS=/shared:/shared;/scratch:/scratch:ro'" in script
    assert "container runtime oci" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "r" / "job.sbatch")], check=False).returncode == 0
    bad = subprocess.run([*base, "--set", "image=localhost/mbl-trainer:0.1.0"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "images/bundle.sh" in bad.stderr
