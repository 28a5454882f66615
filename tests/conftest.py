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


# ---- parallel runs (pytest -n 2 --dist loadgroup, as scripts/test.sh runs them) ---------------------------
# The local Slurm cluster has two nodes and podman one store: every test that submits to the cluster or runs
# containers goes to one worker, in order ("cluster"); every other file stays whole on one worker, so its
# module fixtures (a trained model, a prepared corpus) are built once.
CLUSTER_FILES = ("test_containers", "test_slurm_cluster", "test_slurm_faults", "test_slurm_tour", "test_load")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marked as each test is collected, before xdist's collection hook turns the mark into the group."""
    file = item.path.stem
    cluster = item.get_closest_marker("slurm") is not None or file.startswith(CLUSTER_FILES)
    item.add_marker(pytest.mark.xdist_group("cluster" if cluster else file))


def _fuzz_counts_dir(config: pytest.Config) -> Path:
    folder = config.rootpath / ".pytest_cache" / "fuzz-examples"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a plain run): start from zero
        for old in _fuzz_counts_dir(session.config).glob("*.json"):
            old.unlink()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker hands its example counts to the controller through the cache directory."""
    fuzz = sys.modules.get("fuzz_util")
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker and fuzz is not None and fuzz.EXAMPLES:
        import json

        (_fuzz_counts_dir(session.config) / f"{worker}.json").write_text(
            json.dumps({"examples": fuzz.EXAMPLES, "outcomes": fuzz.OUTCOMES}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many examples each property-based test ran (tests/fuzz_util.py), so that CI logs show them."""
    import json
    from collections import Counter

    counts: Counter[str] = Counter()
    outcomes: dict[str, Counter[str]] = {}
    fuzz = sys.modules.get("fuzz_util")
    parts = [{"examples": fuzz.EXAMPLES, "outcomes": fuzz.OUTCOMES}] if fuzz is not None else []
    parts += [json.loads(p.read_text()) for p in _fuzz_counts_dir(terminalreporter.config).glob("*.json")]
    for part in parts:
        counts.update(part["examples"])
        for name, ends in part["outcomes"].items():
            outcomes.setdefault(name, Counter()).update(ends)
    if not counts:
        return
    profile = os.environ.get("MBL_FUZZ_PROFILE", "ci")
    terminalreporter.section(f"hypothesis examples (profile {profile})")
    for name, count in sorted(counts.items()):  # how the runs of mbl ended: a property must see both
        ends = outcomes.get(name)
        tail = f"   (mbl runs: {ends['ok']} ok, {ends['refused']} refused)" if ends else ""
        terminalreporter.write_line(f"{count:7d}  {name}{tail}")
    terminalreporter.write_line(f"{sum(counts.values()):7d}  in all")
