"""Shared fixtures: every test gets its own registry ($MBL_HOME) and profile location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["slurm_util"]  # the `cluster` fixture of the Slurm tests

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("mbl-home")
    monkeypatch.setenv("MBL_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.delenv("MBL_PROFILE", raising=False)
    monkeypatch.delenv("MBL_QUOTA_POLICY", raising=False)
    return home


@pytest.fixture
def mbl_env() -> dict[str, str]:
    """Environment for running `mbl` as a subprocess, as a user would."""
    env = dict(os.environ)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    return env


def _slurm_answers() -> bool:
    import subprocess

    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(autouse=True)
def _needs_slurm(request: pytest.FixtureRequest) -> None:
    """Tests marked `slurm` need the local cluster. scripts/test.sh (and so CI) sets MBL_REQUIRE_SLURM=1:
    there a missing cluster fails the test instead of skipping it."""
    if request.node.get_closest_marker("slurm") is None or _slurm_answers():
        return
    message = "no Slurm cluster answers (start one: slurm/dev/up.sh; source /tmp/mbl-slurm/env.sh)"
    if os.environ.get("MBL_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)
