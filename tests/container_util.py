"""Helpers of the container tests: the trainer image (images/build.sh), podman with this project's settings.

The image is $MBL_IMAGE, else localhost/mbl-trainer:<version> (what `images/build.sh --cpu` tags last).
Without podman or the image the tests skip, except under scripts/test.sh (MBL_REQUIRE_CONTAINERS=1, and so
CI), which builds the image first and makes them fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("MBL_IMAGE") or f"localhost/mbl-trainer:{VERSION}"
SLURM_DIR = Path(os.environ.get("MBL_SLURM_DIR", "/tmp/mbl-slurm"))


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "images" / "containers.conf"))
    return env


def podman(*args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout,
                          **kw, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _unavailable(message: str) -> None:
    if os.environ.get("MBL_REQUIRE_CONTAINERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_image() -> str:
    """The trainer image's name; skips (or fails under scripts/test.sh) when podman or the image is missing."""
    if shutil.which("podman") is None:
        _unavailable("podman is not installed (images/setup.sh installs it)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        _unavailable(f"no image {IMAGE} (build it: images/build.sh --cpu)")
    return IMAGE


def bundle(image: str, path: Path) -> Path:
    """The OCI bundle of `image` at `path` (images/bundle.sh: made again only when the image changed)."""
    proc = subprocess.run([str(ROOT / "images" / "bundle.sh"), image, str(path)], env=podman_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"images/bundle.sh failed:\n{proc.stdout}\n{proc.stderr}")
    return path


def owners(root: Path) -> set[tuple[int, int]]:
    """(uid, gid) of every file and folder under root, root included."""
    found = {(root.stat().st_uid, root.stat().st_gid)}
    for path in root.rglob("*"):
        st = path.lstat()
        found.add((st.st_uid, st.st_gid))
    return found
