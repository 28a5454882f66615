"""Golden files: compared with a readable diff; regenerated only with MBL_UPDATE_GOLDEN=1."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(relpath: str, actual: str) -> None:
    path = GOLDEN / relpath
    if os.environ.get("MBL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(f"no golden file {path}; create it with MBL_UPDATE_GOLDEN=1 and review it")
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"golden/{relpath}", "rendered"))
        raise AssertionError(f"rendered output differs from golden/{relpath} "
                             f"(MBL_UPDATE_GOLDEN=1 regenerates it):\n{diff}")
